"""The built-in RL algorithms, registered by name (``tune.algorithm``). A new algorithm is one
file with its settings class and a ``build`` classmethod, plus one line here (or, outside this
package, an ``rlhf.algorithms`` entry point or an import path in ``tune.algorithm``)."""

from rlhf.algorithms.common import ALGORITHMS, AlgorithmSpec
from rlhf.algorithms.kl_control import KLControl, KLControlConfig
from rlhf.algorithms.mrt import MRT, MRTConfig
from rlhf.algorithms.ppo import PPO, PPOConfig
from rlhf.algorithms.rloo import RLOO, RLOOConfig
from rlhf.algorithms.tilt import Tilt, TiltConfig

ALGORITHMS.register("ppo", AlgorithmSpec(PPOConfig, PPO.build, doc="PPO with a per-token KL penalty (Ziegler et al. 2019)"))
ALGORITHMS.register("rloo", AlgorithmSpec(RLOOConfig, RLOO.build, doc="REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024)"))
ALGORITHMS.register("tilt", AlgorithmSpec(TiltConfig, Tilt.build, doc="on-policy distillation of the prior tilted by every action's reward"))
ALGORITHMS.register("mrt", AlgorithmSpec(MRTConfig, MRT.build, doc="minimum risk training over k candidates (Shen et al. 2016)"))
for _kind, _doc in (("q", "Q-learning"), ("psi", "Ψ-learning"), ("g", "G-learning")):
    ALGORITHMS.register(_kind, AlgorithmSpec(KLControlConfig, KLControl.build, section="kl_control", doc=f"Sequence Tutor's {_doc} (Jaques et al. 2017)"))
