"""What block-sparse methods share: a `BlockLayout` per call, computed block by block (only the
kept key blocks); a single decoding query attends its whole dense cache exactly, so generation
stays correct."""

from __future__ import annotations

from ...errors import PatchError
from ...ops.block_sparse import block_sparse_attention
from ...ops.block_sparse_flex import flex_available, flex_block_sparse_attention, flex_tile
from ...runtime.exact import exact_attention
from ..base import Method, ParamSpec

BLOCK_SIZE = ParamSpec("block_size", int, 64, "tokens per query and key block", low=1, high=8192)
BACKEND = ParamSpec("backend", str, "auto", "kernel for the kept blocks: 'torch' (gathers the kept keys, "
                    "chunked SDPA-style math; the CPU default), 'flex' (PyTorch FlexAttention with a block mask; "
                    "compiled on CUDA), 'auto' (flex on CUDA when the layout and block size allow it, else torch)",
                    choices=("auto", "torch", "flex"))




class BlockSparseMethod(Method):
    family = "sparse"
    params = (BLOCK_SIZE, BACKEND)
    extra_keys = False  # layouts with single extra keys (vertical_slash) have no FlexAttention form
    last_backend: str | None = None  # the kernel the latest sparse call ran ("torch" or "flex")
    _density_of_last_call = None  # a function giving it, called only when `last_density` is read

    @property
    def last_density(self) -> float | None:
        """Computed / dense key blocks of the latest sparse call (for benchmarks). Worked out when read:
        on a GPU reading a count waits for the device, which every layer's call would otherwise do."""
        return None if self._density_of_last_call is None else self._density_of_last_call()

    def layout(self, call):
        raise NotImplementedError

    def skips_blocks(self, call) -> bool:
        """False for a decoding step or a single key block: nothing to skip."""
        return call.query.shape[-2] > 1 and call.key.shape[-2] > self.config["block_size"]

    def needs_unpadded_rows(self, call) -> bool:  # blocks start at a row's first real token
        return self.skips_blocks(call)

    def attention(self, call):
        lk = call.key.shape[-2]
        if not self.skips_blocks(call):
            return exact_attention(call)
        layout = self.layout(call)
        causal = call.causal
        self._density_of_last_call = lambda: layout.density(lk, causal)
        if self.uses_flex(call):
            self.last_backend = "flex"
            return flex_block_sparse_attention(call.query, call.key, call.value, layout, call.mask,
                                               causal=call.causal, scaling=call.scaling, softcap=call.softcap)
        self.last_backend = "torch"
        return block_sparse_attention(call.query, call.key, call.value, layout, call.mask,
                                      causal=call.causal, scaling=call.scaling, softcap=call.softcap)

    def uses_flex(self, call) -> bool:
        backend = self.config.get("backend", "torch")
        # auto: the compiled kernel needs a tile of >= 16 tokens dividing the block (block_size 64 or 128 has one)
        return backend == "flex" or (backend == "auto" and call.query.is_cuda and not self.extra_keys
                                     and flex_tile(self.config["block_size"]) is not None and flex_available())

    @classmethod
    def check_params(cls, params):
        if params.get("backend") == "flex":
            if cls.extra_keys:
                raise PatchError(f"{cls.name} keeps single key tokens that a FlexAttention block mask cannot "
                                 "express: use backend='torch' or 'auto' (auto keeps it on the torch kernel)")
            if not flex_available():
                raise PatchError("backend='flex' needs torch.nn.attention.flex_attention (PyTorch >= 2.5); "
                                 "use backend='torch'")

    def check_site(self, site) -> None:  # per-kv-head list parameters must match the layer
        for spec in self.params:
            if spec.kind is list and self.config.get(spec.name) is not None:
                if len(self.config[spec.name]) != site.num_kv_heads:
                    raise PatchError(f"{self.name}: {spec.name} has {len(self.config[spec.name])} entries but "
                                     f"{site.path} has {site.num_kv_heads} kv heads; give one value per kv head")
