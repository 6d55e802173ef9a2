"""agent: Agent Attention over pooled agent tokens."""

from __future__ import annotations

from ...errors import PatchError
from ...ops.grid2d import agent_attention, pool_agents
from ..base import Paper, ParamSpec
from .grid import GridMethod


class AgentAttention(GridMethod):
    name = "agent"
    paper = Paper('Agent Attention: On the Integration of Softmax and Linear Attention', 2023, "https://arxiv.org/abs/2312.08874")
    deviations = ()
    summary = ("Agent attention for ViT/DiT: agent tokens (the patch queries average-pooled to an "
               "agent_grid x agent_grid grid) attend all keys, then every query attends the agents: "
               "O(L * agents) instead of O(L^2). Training-free it approximates; recipes can fine-tune after.")
    params = (ParamSpec("agent_grid", int, 7, "side of the agent grid (agent_grid^2 agent tokens)", low=1),
              *GridMethod.grid_params)

    def grid_attention(self, call, patch_grid):
        if call.softcap is not None:
            raise PatchError("agent attention has no softcapped form; use window_2d or a dense method here")
        agents = pool_agents(call.query, patch_grid, min(self.config["agent_grid"], patch_grid.height,
                                                         patch_grid.width))
        return agent_attention(call.query, call.key, call.value, agents, scaling=call.scaling,
                               key_valid=call.key_valid())
