"""Drive the real vLLM scheduler and model-runner connector plumbing on CPU, in one process.

Lifted from the research harness (``research/vllm``: ``_harness_body.py``, ``REPORT.md``) and
shared by ``test_vllm_scheduler.py`` and ``test_vllm_worker.py``. Import it only once vLLM is
known to be importable.

The pieces:

- configs: :func:`make_vllm_config`, :func:`make_kv_cache_config`, :func:`make_scheduler`
  build vLLM's own objects for a tiny two-layer Llama (``tests/data/tiny_llama``), with
  ``KVortexConnector`` loaded by vLLM's factory from ``kv_connector_module_path``;
- KV tensors: :func:`allocate_kv` runs vLLM's own allocator for one layout (0.33:
  ``allocate_kv_cache``; 0.15: the GPU model runner's allocate/reshape methods);
- :class:`Worker`: a worker-role connector over those tensors, stepped through the hooks the
  way a model runner calls them (``"v2"``: 0.33's Model Runner V2, ``"v1"``: the runner mixin,
  ``"manual"``: the hooks called one by one). Its "forward pass" writes a recognisable pattern
  (a function of layer, position, token id and the worker's salt) into the KV of every
  scheduled token, so any block's content can be checked against what it must hold;
- :class:`EngineLoop`: the scheduler and its workers stepped like vLLM's engine core:
  ``schedule()`` -> workers -> ``KVOutputAggregator`` -> ``update_from_output()``. After every
  step it checks that every running request's computed tokens hold exactly their pattern: a
  load that delivered wrong bytes fails there.
"""

from __future__ import annotations

import inspect
import types
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import torch
import vllm
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer import kv_transfer_state
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.forward_context import get_forward_context, set_forward_context
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

from kvortex.plan import TransferPlan

VLLM_VERSION = tuple(int(x) for x in vllm.__version__.split(".")[:2])
# The 0.33 line (>= 0.30): Model Runner V2, allocate_kv_cache with named layouts,
# get_transfer_results / failed_recving, handle_preemptions(metadata).
MODERN = VLLM_VERSION >= (0, 30)

# Where these live moved between releases: found by trying, newest place first.
try:
    from vllm.model_executor.layers.attention.kv_transfer_utils import maybe_transfer_kv_layer
except ImportError:  # 0.15
    from vllm.attention.utils.kv_transfer_utils import maybe_transfer_kv_layer
try:
    from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups
except ImportError:  # 0.15, 0.26
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups

MODEL_DIR = Path(__file__).parent / "data" / "tiny_llama"
BLOCK = 16  # vLLM block size in these tests
CHUNK = 32  # KVortex chunk_tokens: two blocks
EOS = 2
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")
SYNC = 10**9  # async_load_min_tokens that keeps every load inside the step
ASYNC = 1  # async_load_min_tokens that makes every load asynchronous

CONNECTOR = "KVortexConnector"
CONNECTOR_MODULE = "kvortex.integrations.vllm"

# Layouts a worker test runs over: 0.33 names vLLM's KVCacheLayout; 0.15 names the attention
# backend and its NHD/HND stride order.
WORKER_LAYOUTS = ("LBNHC", "LBHNC", "BLNHC", "BLHNC") if MODERN else ("fa-nhd", "fa-hnd", "fi-nhd")
# Runner plumbing: 0.33 defaults to Model Runner V2; V1 is still selectable there.
RUNNER_MODES = ("v2", "v1") if MODERN else ("v1",)

SENTINEL = -23131  # int16 0xA5A5: what wipe() leaves in every byte pair

init_none_hash(sha256)
_HASHER = get_request_block_hasher(BLOCK, sha256)


# -- configuration ----------------------------------------------------------------------------


def extra_config(**overrides: Any) -> dict[str, Any]:
    """``kv_connector_extra_config`` for the tests: 32-token chunks, 16 MiB of host tier, loads
    inside the step (pass ``async_load_min_tokens=ASYNC`` for asynchronous loads)."""
    config: dict[str, Any] = {
        "chunk_tokens": CHUNK,
        "cpu_bytes": "16MiB",
        "async_load_min_tokens": SYNC,
    }
    config.update(overrides)
    return config


def make_vllm_config(
    extra: dict[str, Any] | None = None,
    *,
    layout: str | None = None,
    tp_size: int = 1,
    rank: int = 0,
    policy: str = "recompute",
) -> VllmConfig:
    """A VllmConfig for the tiny model with KVortexConnector as its KV connector.

    ``layout`` (0.33 only): the resolved KV cache layout; None resolves it the way vLLM's engine
    core does, asking the connector's ``get_required_kvcache_layout``. ``rank`` is set on the
    parallel config the way vLLM's worker does before it creates the worker-role connector.
    """
    model = ModelConfig(
        model=str(MODEL_DIR),
        tokenizer=str(MODEL_DIR),
        skip_tokenizer_init=True,
        dtype="float16",
        max_model_len=2048,
        seed=0,
    )
    scheduler = SchedulerConfig(
        max_model_len=2048,
        is_encoder_decoder=False,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        enable_chunked_prefill=True,
        async_scheduling=False,
    )
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=True, gpu_memory_utilization=0.9)
    transfer = KVTransferConfig(
        kv_connector=CONNECTOR,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role="kv_both",
        kv_connector_extra_config=dict(extra_config() if extra is None else extra),
        kv_load_failure_policy=policy,
    )
    vc = VllmConfig(
        model_config=model,
        cache_config=cache,
        scheduler_config=scheduler,
        kv_transfer_config=transfer,
        device_config=DeviceConfig("cpu"),
        parallel_config=ParallelConfig(tensor_parallel_size=tp_size),
    )
    vc.parallel_config.rank = rank
    if MODERN:
        if layout is None:
            from vllm.v1.attention.backends.utils import resolve_kv_cache_layout

            # What the engine core does (FlashAttention accepts all four layouts).
            resolve_kv_cache_layout(vc, [["LBNHC", "LBHNC", "BLNHC", "BLHNC"]])
        else:
            vc.cache_config.kv_cache_layout = layout
    return vc


def attention_spec(vc: VllmConfig) -> FullAttentionSpec:
    """The per-rank attention spec of the tiny model (KV heads divided by the TP size)."""
    mc = vc.model_config
    return FullAttentionSpec(
        block_size=BLOCK,
        num_kv_heads=mc.get_num_kv_heads(vc.parallel_config),
        head_size=mc.get_head_size(),
        dtype=torch.float16,
    )


def make_kv_cache_config(vc: VllmConfig, num_blocks: int) -> Any:
    """vLLM's KVCacheConfig for ``num_blocks`` blocks (block 0 is vLLM's null block)."""
    spec = attention_spec(vc)
    groups = [KVCacheGroupSpec(list(LAYERS), spec)]
    kcc = get_kv_cache_config_from_groups(
        vc, groups, available_memory=num_blocks * spec.page_size_bytes * len(LAYERS)
    )
    assert kcc.num_blocks == num_blocks, kcc.num_blocks
    vc.cache_config.num_gpu_blocks = num_blocks
    return kcc


def make_scheduler(vc: VllmConfig, num_blocks: int = 64) -> Scheduler:
    """vLLM's Scheduler; it creates the scheduler-role connector through the factory."""
    kcc = make_kv_cache_config(vc, num_blocks)
    return Scheduler(
        vllm_config=vc,
        kv_cache_config=kcc,
        structured_output_manager=StructuredOutputManager(vc),
        block_size=BLOCK,
        log_stats=True,
    )


def make_request(request_id: str, tokens: Sequence[int], max_tokens: int = 1) -> Request:
    """A vLLM request for ``tokens`` that stops after ``max_tokens`` sampled tokens."""
    params = SamplingParams(max_tokens=max_tokens)
    params.update_from_generation_config({}, EOS)
    kwargs: dict[str, Any] = {} if MODERN else {"eos_token_id": EOS}
    return Request(
        request_id=request_id,
        prompt_token_ids=list(tokens),
        sampling_params=params,
        pooling_params=None,
        block_hasher=_HASHER,
        **kwargs,
    )


def prompt(n: int, start: int = 100) -> list[int]:
    """``n`` distinct token ids from ``start`` (the tiny vocabulary has 1024)."""
    assert start + n <= 1024
    return list(range(start, start + n))


# -- KV tensors -------------------------------------------------------------------------------


@dataclass
class KVCaches:
    """vLLM's KV tensors of one worker and how a token's slot is addressed in them.

    ``kind``: ``"bhnc"`` (0.33, ``[B, H, N, K|V]`` views), ``"fa"`` (0.15 FlashAttention,
    ``[2, B, N, H, D]``) or ``"fi"`` (0.15 FlashInfer, ``[B, 2, N, H, D]``).
    """

    tensors: dict[str, torch.Tensor]
    kind: str
    layout: str

    def token_shape(self) -> tuple[int, ...]:
        t = self.tensors[LAYERS[0]]
        if self.kind == "bhnc":
            return (t.shape[1], t.shape[3])
        if self.kind == "fa":
            return (2, t.shape[3], t.shape[4])
        return (2, t.shape[3], t.shape[4])

    def read(self, layer: str, slots: torch.Tensor) -> torch.Tensor:
        """The raw 16-bit words of the tokens at ``slots``: ``[n, *token_shape]``."""
        t = self.tensors[layer].view(torch.int16)
        b, o = slots // BLOCK, slots % BLOCK
        if self.kind == "bhnc":
            return t[b, :, o, :].clone()
        if self.kind == "fa":
            return t[:, b, o].transpose(0, 1).clone()
        return t[b, :, o].clone()

    def write(self, layer: str, slots: torch.Tensor, words: torch.Tensor) -> None:
        t = self.tensors[layer].view(torch.int16)
        b, o = slots // BLOCK, slots % BLOCK
        if self.kind == "bhnc":
            t[b, :, o, :] = words
        elif self.kind == "fa":
            t[:, b, o] = words.transpose(0, 1)
        else:
            t[b, :, o] = words

    def wipe(self) -> None:
        """Every byte of every tensor set to 0xA5 (a finite fp16 value, unlike NaN)."""
        seen: set[int] = set()
        for t in self.tensors.values():
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            torch.empty(0, dtype=torch.uint8).set_(storage).fill_(0xA5)


def allocate_kv(vc: VllmConfig, kcc: Any, layout: str) -> KVCaches:
    """The KV tensors vLLM itself allocates on CPU for ``layout`` (see WORKER_LAYOUTS)."""
    if MODERN:
        from vllm.v1.kv_cache_interface import KVCacheLayout
        from vllm.v1.worker.utils import allocate_kv_cache

        tensors = allocate_kv_cache(kcc, torch.device("cpu"), KVCacheLayout[layout])
        return KVCaches(dict(tensors), "bhnc", layout)
    backend_name, order = layout.split("-")
    if backend_name == "fa":
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend as backend
    else:
        with warnings.catch_warnings():
            # Importing FlashInfer on 0.15 emits DeprecationWarnings from nvidia_cutlass_dsl
            # (tcgen05.OperandMajorMode, cutlass.utils.LayoutEnum): REPORT.md section 11.
            warnings.filterwarnings(
                "ignore", category=DeprecationWarning, module=r"(nvidia_cutlass_dsl|cutlass).*"
            )
            warnings.filterwarnings(
                "ignore", message=r".*(tcgen05|cutlass).*", category=DeprecationWarning
            )
            from vllm.v1.attention.backends.flashinfer import FlashInferBackend as backend
    return KVCaches(_allocate_015(vc, kcc, backend, order.upper()), backend_name, layout)


def _allocate_015(vc: VllmConfig, kcc: Any, backend: Any, order: str) -> dict[str, torch.Tensor]:
    """GPUModelRunner's own _allocate_kv_cache_tensors / _reshape_kv_cache_tensors, unbound,
    on a minimal stand-in ``self`` (0.15)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends import utils as backend_utils
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.utils import AttentionGroup

    groups = [AttentionGroup(backend, list(LAYERS), attention_spec(vc), 0)]
    runner = types.SimpleNamespace(
        device=torch.device("cpu"),
        runner_only_attn_layers=set(),
        cache_config=vc.cache_config,
        kv_cache_config=kcc,
        attn_groups=[groups],
    )
    runner._kv_cache_spec_attn_group_iterator = lambda: iter(groups)
    runner._update_hybrid_attention_mamba_layout = lambda *args: None
    runner._has_mixed_attention_kv_layout = lambda sizes: False  # one backend: no mix (0.26)
    backend_utils.set_kv_cache_layout(order)  # what get_kv_cache_layout() will return
    backend_utils.get_kv_cache_layout.cache_clear()
    try:
        with set_current_vllm_config(vc):
            raw = GPUModelRunner._allocate_kv_cache_tensors(runner, kcc)
            reshape = GPUModelRunner._reshape_kv_cache_tensors
            if "kv_cache_config" in inspect.signature(reshape).parameters:  # 0.15
                return dict(reshape(runner, kcc, raw, [BLOCK]))
            return dict(reshape(runner, raw, [BLOCK]))  # 0.26: reads self.kv_cache_config
    finally:
        backend_utils.set_kv_cache_layout(None)
        backend_utils.get_kv_cache_layout.cache_clear()


def pattern(
    layer: int, positions: torch.Tensor, tokens: torch.Tensor, shape: Sequence[int], salt: int
) -> torch.Tensor:
    """The 16-bit words the fake forward pass writes for these tokens: ``[n, *shape]``.

    A function of (layer, position, token id, salt) that differs in every element; bit 14 is
    cleared so that as fp16 / bf16 every word is finite (bitwise comparisons stay meaningful
    even through copies that go through float registers).
    """
    base = torch.arange(prod(shape), dtype=torch.int64).reshape(1, *shape)
    mix = tokens.to(torch.int64) * 1_000_003 + positions.to(torch.int64) * 7_919
    mix = mix + layer * 104_729 + salt * 15_485_863
    words = (base * 40_503 + mix.reshape(-1, *([1] * len(shape)))) % 65_536
    words = words & 0xBFFF
    return torch.where(words >= 32_768, words - 65_536, words).to(torch.int16)


# -- worker -----------------------------------------------------------------------------------


@dataclass
class ForwardWrite:
    """The KV one request computes in one step: tokens ``positions`` at ``slots``."""

    request_id: str
    slots: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor


class Worker:
    """A worker-role KVortexConnector over vLLM-allocated KV tensors, stepped like a runner.

    Args:
        vc: this worker's VllmConfig (its ``parallel_config.rank`` is the worker's rank).
        kcc: the KVCacheConfig the scheduler was built with.
        layout: one of WORKER_LAYOUTS.
        mode: ``"v2"`` (0.33 Model Runner V2: ``ActiveKVConnector``), ``"v1"``
            (``KVConnectorModelRunnerMixin``) or ``"manual"`` (each hook called here, in the
            runners' order, with an explicit ForwardContext).
        salt: mixed into the pattern this worker's forward pass writes (TP ranks differ).
    """

    def __init__(
        self, vc: VllmConfig, kcc: Any, layout: str, mode: str = "manual", salt: int = 0
    ) -> None:
        self.vc, self.mode, self.salt = vc, mode, salt
        self.kv = allocate_kv(vc, kcc, layout)
        self.kv.wipe()
        self.connector = KVConnectorFactory.create_connector(vc, KVConnectorRole.WORKER, kcc)
        context = vc.compilation_config.static_forward_context
        for name in LAYERS:  # stand-in attention layers: the hooks only read .kv_cache
            t = self.kv.tensors[name]
            context[name] = types.SimpleNamespace(kv_cache=t if MODERN else [t])
        self._writes: list[ForwardWrite] = []
        kv_transfer_state._KV_CONNECTOR_AGENT = self.connector
        if mode == "v2":
            from vllm.v1.worker.gpu.kv_connector import ActiveKVConnector

            # Its constructor calls register_kv_caches and set_host_xfer_buffer_ops.
            self.active = ActiveKVConnector(vc, self.kv.tensors)
        else:
            self.connector.register_kv_caches(self.kv.tensors)
            if mode == "v1":
                from vllm.distributed.kv_transfer.kv_connector.utils import copy_kv_blocks

                self.connector.set_host_xfer_buffer_ops(copy_kv_blocks)

        @maybe_transfer_kv_layer
        def attention(query: torch.Tensor, layer_name: str) -> torch.Tensor:
            self._compute(layer_name)
            return query

        self._attention = attention

    # The "forward pass": write this step's tokens' KV pattern into each layer.
    def _compute(self, layer_name: str) -> None:
        shape = self.kv.token_shape()
        index = LAYERS.index(layer_name)
        for w in self._writes:
            words = pattern(index, w.positions, w.tokens, shape, self.salt)
            self.kv.write(layer_name, w.slots, words)

    def expected(self, layer: str, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return pattern(LAYERS.index(layer), positions, tokens, self.kv.token_shape(), self.salt)

    def run(self, so: Any, writes: Sequence[ForwardWrite]) -> KVConnectorOutput:
        """One step of scheduler output ``so``; returns what the runner would report."""
        kv_transfer_state._KV_CONNECTOR_AGENT = self.connector  # the layer hooks' connector
        self._writes = list(writes)
        n = so.total_num_scheduled_tokens
        slot = torch.zeros(max(n, 1), dtype=torch.long)
        attn = {name: types.SimpleNamespace(slot_mapping=slot) for name in LAYERS}
        slots = {name: slot for name in LAYERS}
        try:
            if self.mode == "manual":
                return self._run_manual(so, attn, slots)
            if self.mode == "v2":
                return self._run_v2(so, attn, slots)
            return self._run_v1(so, attn, slots)
        finally:
            self._writes = []

    def _layers(self) -> None:
        query = torch.zeros(1)
        for name in LAYERS:
            self._attention(query, name)

    def _run_v2(self, so: Any, attn: dict[str, Any], slots: dict[str, Any]) -> KVConnectorOutput:
        if so.total_num_scheduled_tokens == 0:
            return self.active.no_forward(so).kv_connector_output or KVConnectorOutput()
        batch = types.SimpleNamespace(
            idx_mapping=torch.arange(len(so.num_scheduled_tokens)),
            req_ids=list(so.num_scheduled_tokens),
            num_tokens=so.total_num_scheduled_tokens,
        )
        with set_forward_context(attn, self.vc, slot_mapping=slots):
            self.active.pre_forward(so, batch)
            self._layers()
        self.active.finish_forward()
        return self.active.post_forward(so.finished_req_ids) or KVConnectorOutput()

    def _run_v1(self, so: Any, attn: dict[str, Any], slots: dict[str, Any]) -> KVConnectorOutput:
        if MODERN:
            self.connector.handle_preemptions(so.kv_connector_metadata)
        elif so.preempted_req_ids:
            self.connector.handle_preemptions(so.preempted_req_ids)
        if so.total_num_scheduled_tokens == 0:
            out = KVConnectorModelRunnerMixin.kv_connector_no_forward(so, self.vc)
            return out.kv_connector_output or KVConnectorOutput()
        with (
            set_forward_context(attn, self.vc, slot_mapping=slots),
            KVConnectorModelRunnerMixin._get_kv_connector_output(so) as output,
        ):
            self._layers()
        return output

    def _run_manual(
        self, so: Any, attn: dict[str, Any], slots: dict[str, Any]
    ) -> KVConnectorOutput:
        conn = self.connector
        meta = so.kv_connector_metadata
        if MODERN:
            conn.handle_preemptions(meta)
        elif so.preempted_req_ids:
            conn.handle_preemptions(set(so.preempted_req_ids))
        conn.bind_connector_metadata(meta)
        forward = so.total_num_scheduled_tokens > 0
        with set_forward_context(attn if forward else None, self.vc, slot_mapping=slots):
            conn.start_load_kv(get_forward_context())
            if forward:
                for name in LAYERS:
                    conn.wait_for_layer_load(name)
                    self._compute(name)
                    conn.save_kv_layer(name, self.kv.tensors[name], attn[name])
        if forward or MODERN:  # 0.15's no-forward path skips wait_for_save
            conn.wait_for_save()
        output = self.collect(so.finished_req_ids)
        conn.clear_connector_metadata()
        return output

    def run_metadata(self, meta: Any, finished_req_ids: Iterable[str] = ()) -> KVConnectorOutput:
        """One step without a forward pass for hand-built metadata, hooks called one by one."""
        kv_transfer_state._KV_CONNECTOR_AGENT = self.connector
        so = types.SimpleNamespace(
            kv_connector_metadata=meta,
            preempted_req_ids=set(),
            total_num_scheduled_tokens=0,
            finished_req_ids=set(finished_req_ids),
        )
        return self._run_manual(so, {}, {})

    def collect(self, finished_req_ids: Iterable[str]) -> KVConnectorOutput:
        """get_transfer_results (0.33) / get_finished (0.15) and the load errors."""
        conn = self.connector
        failed: set[str] = set()
        if MODERN:
            results = conn.get_transfer_results(set(finished_req_ids))
            sending, recving = results.finished_sending, results.finished_recving
            failed = set(results.failed_recving or ())
        else:
            sending, recving = conn.get_finished(set(finished_req_ids))
        return connector_output(
            finished_sending=set(sending or ()),
            finished_recving=set(recving or ()),
            failed_recving=failed,
            invalid_block_ids=set(conn.get_block_ids_with_load_errors()),
        )

    def close(self) -> None:
        if kv_transfer_state._KV_CONNECTOR_AGENT is self.connector:
            kv_transfer_state._KV_CONNECTOR_AGENT = None
        self.connector.shutdown()


def connector_output(**fields: Any) -> KVConnectorOutput:
    """KVConnectorOutput with the fields this vLLM has (0.15 has no failed_recving)."""
    if not MODERN:
        fields.pop("failed_recving", None)
    for name in ("finished_sending", "finished_recving"):
        if name in fields and not fields[name]:
            fields[name] = None
    return KVConnectorOutput(**fields)


def model_runner_output(so: Any, kv_output: KVConnectorOutput | None, token: int = 7) -> Any:
    """What a model runner returns: one sampled token per scheduled request."""
    req_ids = list(so.num_scheduled_tokens)
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=[[token] for _ in req_ids],
        logprobs=None,
        prompt_logprobs_dict={},
        pooler_output=None,
        kv_connector_output=kv_output,
    )


def build_loop(
    extra: dict[str, Any] | None = None,
    *,
    num_blocks: int = 64,
    layout: str | None = None,
    mode: str | None = None,
    tp_size: int = 1,
) -> EngineLoop:
    """A scheduler with ``tp_size`` workers over vLLM-allocated KV tensors.

    ``layout`` None: 0.33 resolves it through the connector (BLNHC), 0.15 uses FlashAttention
    NHD. ``mode`` None: the runner plumbing this vLLM uses by default. On 0.33, mode ``"v1"``
    needs ``VLLM_USE_V2_MODEL_RUNNER=0`` set while the scheduler is built and runs.
    """
    vc = make_vllm_config(extra, layout=layout if MODERN else None, tp_size=tp_size)
    scheduler = make_scheduler(vc, num_blocks)
    if layout is None:
        layout = vc.cache_config.kv_cache_layout if MODERN else "fa-nhd"
    mode = mode or RUNNER_MODES[0]
    workers = []
    for rank in range(tp_size):
        worker_vc = vc
        if tp_size > 1:  # each worker process has its own config, with its rank
            worker_vc = make_vllm_config(extra, layout=layout, tp_size=tp_size, rank=rank)
        workers.append(Worker(worker_vc, scheduler.kv_cache_config, layout, mode, salt=rank))
    return EngineLoop(scheduler, workers)


def make_metadata(plan: TransferPlan, **flags: frozenset[str]) -> Any:
    """KVortexMetadata for a hand-built plan."""
    from kvortex.integrations.vllm import KVortexMetadata

    return KVortexMetadata(plan=plan, **flags)


# -- engine loop ------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """What one step did: the scheduler output and the aggregated connector output."""

    so: Any
    kv_output: KVConnectorOutput
    plan: TransferPlan


@dataclass(repr=False)
class EngineLoop:
    """vLLM's engine-core step loop in one process: scheduler, workers, aggregation."""

    scheduler: Scheduler
    workers: list[Worker]
    steps: list[StepRecord] = field(default_factory=list)
    finish_reasons: dict[str, str] = field(default_factory=dict)
    invalid_block_ids: set[int] = field(default_factory=set)
    _held: dict[str, set[str]] = field(default_factory=dict)
    _writes: list[ForwardWrite] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.aggregator = KVOutputAggregator.from_connector(
            self.scheduler.connector, len(self.workers)
        )

    @property
    def connector(self) -> Any:
        """The scheduler-role KVortexConnector."""
        return self.scheduler.connector

    @property
    def side(self) -> Any:
        """Its SchedulerSide (directory, pins)."""
        return self.scheduler.connector.scheduler_side

    def add(self, request_id: str, tokens: Sequence[int], max_tokens: int = 1) -> Request:
        request = make_request(request_id, tokens, max_tokens)
        self.scheduler.add_request(request)
        return request

    # -- stepping -------------------------------------------------------------------------------

    def schedule(self) -> Any:
        """``scheduler.schedule()``; remembers the KV this step's forward pass computes."""
        so = self.scheduler.schedule()
        self._writes = self._forward_writes(so)
        return so

    def execute(self, so: Any, *, withhold: bool = False) -> Any:
        """Run the workers on ``so`` and feed their aggregated output back to the scheduler.

        ``withhold``: keep the workers' finished_sending / finished_recving back for a later
        step (a slow worker), delivering them with the next step that does not withhold.
        """
        outputs = [model_runner_output(so, worker.run(so, self._writes)) for worker in self.workers]
        merged = self.aggregator.aggregate(outputs)
        kv = merged.kv_connector_output or KVConnectorOutput()
        for name in ("finished_sending", "finished_recving"):
            ids = set(getattr(kv, name) or ())
            if withhold:
                self._held.setdefault(name, set()).update(ids)
                ids = set()
            else:
                ids |= self._held.pop(name, set())
            setattr(kv, name, ids or None)
        merged.kv_connector_output = kv
        self.invalid_block_ids |= set(kv.invalid_block_ids or ())
        self.steps.append(StepRecord(so, kv, so.kv_connector_metadata.plan))
        engine_outputs = self.scheduler.update_from_output(so, merged)
        for client_outputs in engine_outputs.values():
            for out in client_outputs.outputs:
                if out.finish_reason is not None:
                    self.finish_reasons[out.request_id] = str(out.finish_reason)
        self.check_kv()
        return engine_outputs

    def step(self, *, withhold: bool = False) -> Any:
        so = self.schedule()
        self.execute(so, withhold=withhold)
        return so

    def run_until_idle(self, max_steps: int = 50) -> None:
        """Step until every request finished and was freed, then one idle step more."""
        for _ in range(max_steps):
            if not self.scheduler.requests and not any(self._held.values()):
                break
            self.step()
        else:
            raise AssertionError(
                f"requests still alive after {max_steps} steps: "
                f"{ {r: q.status.name for r, q in self.scheduler.requests.items()} }"
            )
        self.step()

    def _forward_writes(self, so: Any) -> list[ForwardWrite]:
        computed = {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs}
        cached = so.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        writes = []
        for rid, n in so.num_scheduled_tokens.items():
            request = self.scheduler.requests[rid]
            start = computed[rid]
            positions = torch.arange(start, start + n)
            tokens = torch.tensor(list(request.all_token_ids)[start : start + n])
            writes.append(ForwardWrite(rid, self.slots(rid, positions), positions, tokens))
        return writes

    # -- inspection -----------------------------------------------------------------------------

    def block_ids(self, request_id: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(request_id)[0])

    def slots(self, request_id: str, positions: torch.Tensor) -> torch.Tensor:
        blocks = torch.tensor(self.block_ids(request_id), dtype=torch.long)
        return blocks[positions // BLOCK] * BLOCK + positions % BLOCK

    def free_blocks(self) -> int:
        return int(self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks())

    def num_blocks(self) -> int:
        return int(self.scheduler.kv_cache_config.num_blocks)

    def status(self, request_id: str) -> RequestStatus | None:
        request = self.scheduler.requests.get(request_id)
        return None if request is None else request.status

    def plans(self) -> list[TransferPlan]:
        return [s.plan for s in self.steps]

    def stored_keys(self) -> set[bytes]:
        """Keys that entered the host tier: stored, or read back from a lower tier."""
        stored = {c.key for p in self.plans() for ops in p.stores for c in ops.chunks}
        promoted = {
            c.key
            for p in self.plans()
            for ops in p.loads
            for c in ops.chunks
            if c.disk is not None or c.remote
        }
        return stored | promoted

    def loaded_keys(self) -> set[bytes]:
        return {c.key for p in self.plans() for ops in p.loads for c in ops.chunks}

    def loads_of(self, request_id: str) -> list[Any]:
        """Every ChunkOp loaded for ``request_id`` so far, in plan order."""
        return [
            c
            for p in self.plans()
            for ops in p.loads
            if ops.request_id == request_id
            for c in ops.chunks
        ]

    def snapshot(self, request_id: str, num_tokens: int) -> list[dict[str, torch.Tensor]]:
        """Per worker, per layer: the raw words of the request's first ``num_tokens`` tokens."""
        slots = self.slots(request_id, torch.arange(num_tokens))
        return [{name: w.kv.read(name, slots) for name in LAYERS} for w in self.workers]

    def check_kv(self) -> None:
        """Every running (or finished, not yet freed) request's computed tokens hold exactly
        the pattern of their (position, token id) on every worker."""
        for rid, request in self.scheduler.requests.items():
            finished = request.is_finished()
            if request.status != RequestStatus.RUNNING and not finished:
                continue
            if request.status == RequestStatus.FINISHED_ABORTED:
                continue  # may hold an in-flight load vLLM keeps the blocks for
            n = request.num_computed_tokens
            if n == 0:
                continue
            positions = torch.arange(n)
            tokens = torch.tensor(list(request.all_token_ids)[:n])
            slots = self.slots(rid, positions)
            for worker in self.workers:
                for name in LAYERS:
                    got = worker.kv.read(name, slots)
                    want = worker.expected(name, positions, tokens)
                    if not torch.equal(got, want):
                        bad = sorted({int(p) for p in positions[(got != want).flatten(1).any(1)]})
                        raise AssertionError(
                            f"request {rid} ({request.status.name}): KV of {name} on worker "
                            f"salt={worker.salt} differs from what was computed at positions "
                            f"{bad[:8]}{'...' if len(bad) > 8 else ''} of {n} (blocks "
                            f"{self.block_ids(rid)})"
                        )

    def wipe(self) -> None:
        """Drop vLLM's local prefix cache and overwrite every KV byte: from here on, a prefix
        can only come back through the connector."""
        assert self.scheduler.reset_prefix_cache(), "reset_prefix_cache: blocks still in use"
        for worker in self.workers:
            worker.kv.wipe()

    def assert_clean(self, *, recving_ids_may_linger: bool = False) -> None:
        """No request, block, pin or host slot left behind once everything finished.

        ``recving_ids_may_linger``: vLLM 0.15 never forgets a finished_recving id whose
        request was aborted before it was promoted (its own bookkeeping, whatever the
        connector does); 0.33 does.
        """
        assert not self.scheduler.requests, list(self.scheduler.requests)
        assert self.free_blocks() == self.num_blocks() - 1
        if not recving_ids_may_linger:
            assert not getattr(self.scheduler, "finished_recving_kv_req_ids", set())
        side = self.side
        assert side.pinned_count() == 0
        directory = side.directory
        stored = self.stored_keys()
        present = {k for k in stored if k in directory}
        # Every slot in use holds a committed chunk that some plan stored (no reservation or
        # pin outlives its request).
        assert directory.used == len(present), (directory.used, len(present), len(stored))
        for key in stored | self.loaded_keys():
            assert not directory.pinned(key), key.hex()[:16]

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
