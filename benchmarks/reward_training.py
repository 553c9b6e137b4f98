"""Speed of reward-model training: our Bradley-Terry trainer vs TRL's ``RewardTrainer`` on the
same tiny model, data and batch size, in one run; and VPL's throughput.

Throughput = preference pairs per optimizer step / mean step seconds. Prints ONE JSON line on
stdout (logs go to stderr); about a minute on 2 cores:

    python benchmarks/reward_training.py [--steps 40] [--warmup 3] [--batch 64] [--data music|pets] [--seed 0]

Keys: ``bt_ours_pairs_per_s``, ``bt_trl_pairs_per_s``, ``ratio_ours_vs_trl`` (ours / TRL),
``bt_ours_step_s`` / ``bt_trl_step_s`` (median seconds per step), ``vpl_pairs_per_s`` (context +
target pairs read per second) and ``vpl_target_pairs_per_s`` (pairs in the likelihood),
``distinct_sequence_share`` (distinct sequences / sequences in our BT batches), the setup
(``data``, ``batch``, ``steps``, ``model``) and ``load_avg_1m`` (other processes skew timings).

Fairness, all in this process:

* model: one randomly initialised ``GPT2ForSequenceClassification`` (2 layers, 64 wide, 4 heads,
  num_labels=1, no dropout), saved with ``save_pretrained``; both systems load that folder.
* data: the same preference records (music: simulated raters over Bach-chorale counterpoint,
  ``configs/reward-music.yaml``'s simulator; pets: the Pets-style text set); TRL gets them as a
  ``datasets.Dataset`` with prompt/chosen/rejected and tokenizes them itself (before the clock).
* batch: ``--batch`` pairs per optimizer step for both (TRL: per_device_train_batch_size, no
  gradient accumulation), AdamW (fused) at lr 1e-3, grad-norm clip 1.0, fp32, no gradient
  checkpointing, no logging, evaluation or checkpoints inside the clock.
* timing: TRL = time between consecutive ``on_step_end`` callbacks (batch fetch + collate +
  forward + backward + optimizer); ours = wall time of ``BTTrainer.step`` (batch + forward +
  backward + optimizer). The two are interleaved -- one of our steps runs inside TRL's
  ``on_step_end``, outside TRL's clock -- so load from other processes hits both alike. The first
  ``--warmup`` steps of each are not timed.

Differences that remain: ours runs each distinct sequence of a batch once (pairs that share an
answer reuse its reward; on the music data few do, see ``distinct_sequence_share``) and slices
pre-padded tensors instead of collating Python lists; TRL goes through ``Trainer``'s data
loader and callbacks. Both run the same transformers model code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--data", choices=["music", "pets"], default="music")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import numpy as np
    import torch
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    from reward_models.backbone import build_backbone, build_reward_model
    from reward_models.reward_source import load_reward_model
    from reward_models.bradley_terry import BTConfig, BTTrainer, pair_tensors
    from apps.reward_cli import RewardRunConfig, load_tokenizer
    from reward_models.data import to_hf_dataset
    from apps.simulate import simulate
    from reward_models.vpl import VPLTrainConfig, VPLTrainer, build_vpl, rater_index, sample_rater_batch
    from rlhf.config import load_config
    from rlhf.models import ModelConfig
    from rlhf.pretrain import batch_indices
    from rlhf.runs import Run

    hf_logging.set_verbosity_error()
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(RewardRunConfig, repo / "configs" / f"reward-{args.data}.yaml", ["simulate.raters=40", "simulate.pairs_per_rater=32"])
    if args.data == "music":  # the corpus cache of the default config lives under the repo
        cfg.simulate.music.data.cache_dir = str(repo / cfg.simulate.music.data.cache_dir)
    records = simulate(cfg.simulate).records
    tok = load_tokenizer(cfg.data.tokenizer, [t for r in records for t in (r.prompt, r.chosen, r.rejected)])
    mcfg = ModelConfig(n_layer=2, n_embd=64, n_head=4, dropout=0.0, max_positions=64)
    tmp = Path(tempfile.mkdtemp(prefix="rm-bench-"))
    torch.manual_seed(args.seed)
    build_reward_model(mcfg, tok).save_pretrained(tmp / "init")
    tok.save_pretrained(tmp / "init")
    n_steps = args.steps + args.warmup

    # ours
    ours_model = load_reward_model(tmp / "init").train()
    train = pair_tensors(records, tok)
    bt = BTTrainer(Run(tmp / "ours"), BTConfig(steps=n_steps + 1, batch_size=args.batch, lr=1e-3, warmup_steps=0, checkpoint_every=10**9),
                   ours_model, tok, train, None, seed=args.seed, progress=False)
    ours_times: list[float] = []
    distinct: list[float] = []

    def ours_step() -> None:
        s = bt.loop.step
        idx = torch.as_tensor(batch_indices(len(train), args.batch, s, args.seed))
        distinct.append(len(torch.unique(torch.cat([train.chosen[idx], train.rejected[idx]]))) / (2 * len(idx)))
        t = time.perf_counter()
        bt.step(s)
        ours_times.append(time.perf_counter() - t)

    # TRL, with one of our steps inside its on_step_end (outside its clock)
    from trl import RewardConfig, RewardTrainer

    trl_times: list[float] = []

    class Clock(TrainerCallback):
        mark = None

        def on_step_begin(self, a, state, control, **kw):
            if self.mark is None:
                self.mark = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            trl_times.append(time.perf_counter() - self.mark)
            ours_step()
            self.mark = time.perf_counter()

    ds = to_hf_dataset(records).select_columns(["prompt", "chosen", "rejected"])
    targs = RewardConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=n_steps,
                         learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, logging_strategy="no",
                         save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, bf16=False, disable_dropout=True,
                         gradient_checkpointing=False, dataloader_num_workers=0, seed=args.seed, max_length=None, disable_tqdm=True)
    trainer = RewardTrainer(model=str(tmp / "init"), args=targs, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    trainer.train()

    # VPL on the same backbone size
    vcfg = VPLTrainConfig(steps=n_steps + 1, raters_per_batch=16, targets_per_rater=8, checkpoint_every=10**9, eval_every=10**9)
    torch.manual_seed(args.seed)
    vpl = build_vpl(build_backbone(mcfg, tok), vcfg.latent_dim, vcfg.pair_hidden, vcfg.head_hidden, vcfg.pooling)
    _, rater_pairs = rater_index(records)
    vt = VPLTrainer(Run(tmp / "vpl"), vcfg, vpl, tok, train, rater_pairs, seed=args.seed, progress=False)
    vpl_times, vpl_pairs, vpl_targets = [], [], []
    for s in range(n_steps):
        rng = np.random.default_rng([args.seed, s, 0])  # the batch VPLTrainer.step draws
        rb = sample_rater_batch(rater_pairs, vcfg.raters_per_batch, vcfg.context_sizes, vcfg.targets_per_rater, rng)
        t = time.perf_counter()
        vt.step(s)
        vt.loop.advance()
        vpl_times.append(time.perf_counter() - t)
        vpl_pairs.append(int((rb.context >= 0).sum() + (rb.targets >= 0).sum()))
        vpl_targets.append(int((rb.targets >= 0).sum()))

    w = args.warmup
    ours_s, trl_s, vpl_s = ours_times[w:], trl_times[w:], vpl_times[w:]
    out = {
        "bt_ours_pairs_per_s": args.batch / statistics.mean(ours_s),
        "bt_trl_pairs_per_s": args.batch / statistics.mean(trl_s),
        "ratio_ours_vs_trl": statistics.mean(trl_s) / statistics.mean(ours_s),
        "bt_ours_step_s": statistics.median(ours_s),
        "bt_trl_step_s": statistics.median(trl_s),
        "vpl_pairs_per_s": sum(vpl_pairs[w:]) / sum(vpl_s),
        "vpl_target_pairs_per_s": sum(vpl_targets[w:]) / sum(vpl_s),
        "distinct_sequence_share": statistics.mean(distinct),
        "data": args.data,
        "records": len(records),
        "batch": args.batch,
        "steps": args.steps,
        "model": "gpt2 2x64, 4 heads, num_labels=1",
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
