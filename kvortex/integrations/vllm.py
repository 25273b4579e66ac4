"""``KVortexConnector``: KVortex as a vLLM KV connector (``KVConnectorBase_V1``).

Serve with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVortexConnector",
        "kv_connector_module_path": "kvortex.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"cpu_bytes": "32GiB"}}'

One class serves vLLM 0.15.x and 0.33.x; the differences are feature-detected (see
``docs/vllm.md``). This is the only KVortex module that imports vLLM. The logic lives in
:mod:`kvortex.integrations.scheduler` and :mod:`kvortex.integrations.worker`; this module
translates vLLM's objects into their plain arguments.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1 import base as _base
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvortex.config import KVortexConfig
from kvortex.errors import ConfigError
from kvortex.integrations.compat import vllm_version_note
from kvortex.integrations.scheduler import SchedulerSide, describe_namespace
from kvortex.integrations.worker import WorkerSide
from kvortex.keys import Namespace
from kvortex.plan import DiskPlan, TransferPlan

if TYPE_CHECKING:
    import torch

__all__ = ["KVortexConnector", "KVortexMetadata"]

log = logging.getLogger("kvortex")

# vLLM >= 0.30 (the 0.33 line) reports transfers through get_transfer_results, keeps the blocks
# of an aborted request until its load is reported, passes the metadata to handle_preemptions
# and accepts block-outermost layouts. vLLM 0.15 does none of these.
_MODERN = hasattr(_base, "KVConnectorTransferResults")


@dataclass(frozen=True)
class KVortexMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """One step's instructions to every worker (pickled by vLLM's executor)."""

    plan: TransferPlan
    async_loads: frozenset[str] = frozenset()
    preempted: frozenset[str] = frozenset()
    release_after_load: frozenset[str] = frozenset()
    disk: DiskPlan = DiskPlan()  # noqa: RUF009 - frozen, immutable: one shared default is fine
    rank_namespaces: tuple[bytes, ...] = ()


class KVortexConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """Host-memory KV cache for vLLM: loads stored prefixes, stores finished requests' KV."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        _show_kvortex_logs()
        level, note = vllm_version_note(_vllm_version())
        log.log(level, "%s", note)
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        self.config = KVortexConfig.from_dict(extra)
        cache = vllm_config.cache_config
        self.block_size = int(cache.block_size)
        if self.config.chunk_tokens % self.block_size:
            raise ConfigError(
                f"chunk_tokens={self.config.chunk_tokens} is not a multiple of vLLM's block "
                f"size {self.block_size}"
            )
        parallel = vllm_config.parallel_config
        self.tp_size = int(getattr(parallel, "tensor_parallel_size", 1) or 1)
        chunk_bytes = _chunk_bytes(kv_cache_config, self.config.chunk_tokens // self.block_size)
        self.scheduler_side: SchedulerSide | None = None
        self.worker_side: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            if chunk_bytes is None:
                raise ConfigError("KVortexConnector needs vLLM's kv_cache_config to size slots")
            policy = getattr(vllm_config.kv_transfer_config, "kv_load_failure_policy", "recompute")
            if policy != "recompute":
                log.warning(
                    "kvortex: kv_load_failure_policy=%r: a failed load fails the request; set "
                    "it to 'recompute' so vLLM recomputes instead",
                    policy,
                )
            self.scheduler_side = SchedulerSide(
                self.config,
                _namespace(vllm_config, kv_cache_config, self.tp_size, self.config.tenant_salt),
                self.block_size,
                chunk_bytes,
                hold_blocks_while_loading=not _MODERN,
                num_blocks=getattr(kv_cache_config, "num_blocks", None),
                tp_size=self.tp_size,
            )
        else:
            rank = int(getattr(parallel, "rank", 0) or 0) % self.tp_size
            self.worker_side = WorkerSide(
                self.config, self.block_size, expected_chunk_bytes=chunk_bytes, rank=rank
            )

    # -- scheduler side -----------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        side = self._scheduler()
        if not _cacheable(request):
            return 0, False
        return side.matched_tokens(
            request.request_id,
            request.prompt_token_ids,
            int(request.num_tokens),
            int(num_computed_tokens),
            salt=getattr(request, "cache_salt", None),
        )

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        block_ids = blocks.get_block_ids()[0] if num_external_tokens else ()
        self._scheduler().after_alloc(request.request_id, list(block_ids), num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVortexMetadata:
        preempted = getattr(scheduler_output, "preempted_req_ids", None) or ()
        out = self._scheduler().step(preempted)
        return KVortexMetadata(
            out.plan,
            out.async_loads,
            out.preempted,
            out.release_after_load,
            out.disk,
            out.rank_namespaces,
        )

    def update_connector_output(self, connector_output: Any) -> None:
        self._scheduler().on_worker_output(
            getattr(connector_output, "finished_sending", None) or (),
            getattr(connector_output, "finished_recving", None) or (),
            getattr(connector_output, "invalid_block_ids", None) or (),
        )

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        side = self._scheduler()
        if not _cacheable(request):
            return False, None
        delay = side.finished(
            request.request_id,
            list(request.all_token_ids),
            int(request.num_computed_tokens),
            list(block_ids),
            salt=getattr(request, "cache_salt", None),
        )
        return delay, None

    @property
    def requires_kv_delivery(self) -> bool:
        """A dropped store is only a future miss: vLLM need not wait for delivery."""
        return False

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        # Block-outermost: one page holds every layer of a block, so copies are large.
        return "BLNHC" if _MODERN else None

    # -- worker side --------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker().register(kv_caches)

    def handle_preemptions(self, preempted: Any) -> None:
        ids = preempted.preempted if isinstance(preempted, KVortexMetadata) else preempted
        self._worker().preempted(ids or ())

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if isinstance(meta, KVortexMetadata):
            self._worker().start(
                meta.plan,
                meta.async_loads,
                meta.release_after_load,
                meta.disk,
                meta.rank_namespaces,
            )

    def wait_for_layer_load(self, layer_name: str) -> None:
        # The first layer's call orders the compute stream after the step's in-step loads
        # (a device-side wait: the host does not block); later calls find nothing pending.
        self._worker().wait_sync_loads()

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        # Stores are planned when a request finishes and launched from start_load_kv of the
        # next step: nothing to do per layer.
        return

    def wait_for_save(self) -> None:
        # Stores complete asynchronously and are reported by get_finished.
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker().poll()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker().take_load_errors()

    def shutdown(self) -> None:
        if self.worker_side is not None:
            self.worker_side.close()
        if self.scheduler_side is not None:
            self.scheduler_side.close()

    # -- internals ----------------------------------------------------------------------------

    def _scheduler(self) -> SchedulerSide:
        assert self.scheduler_side is not None, "scheduler-role method on a worker connector"
        return self.scheduler_side

    def _worker(self) -> WorkerSide:
        assert self.worker_side is not None, "worker-role method on a scheduler connector"
        return self.worker_side


def _show_kvortex_logs() -> None:
    """Give the ``kvortex`` logger a handler at INFO when nobody configured logging.

    vLLM sets up only its own ``vllm`` logger; without this the version line and the periodic
    hit-rate line (INFO) would be dropped. Skipped under ``VLLM_CONFIGURE_LOGGING=0`` and
    whenever the ``kvortex`` or the root logger already has a handler (the user's set-up wins).
    """
    logger = logging.getLogger("kvortex")
    if os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "0":
        return
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [kvortex] %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False  # a root handler added later must not print every line twice
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def _vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def _cacheable(request: Any) -> bool:
    """Whether token ids alone determine the request's KV (no LoRA adapter, no multimodal
    input, no prompt embeddings): only then may KVortex load or store it."""
    return not (
        getattr(request, "prompt_token_ids", None) is None
        or getattr(request, "lora_request", None)
        or getattr(request, "mm_features", None)
        or getattr(request, "mm_positions", None)
    )


def _chunk_bytes(kv_cache_config: Any, blocks_per_chunk: int) -> int | None:
    """Host bytes of one chunk on one worker: every layer's page, times blocks per chunk."""
    if kv_cache_config is None:
        return None
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError(
            f"KVortexConnector supports one KV cache group (full attention); this model has "
            f"{len(groups)}"
        )
    spec = groups[0].kv_cache_spec
    return int(spec.page_size_bytes) * len(groups[0].layer_names) * blocks_per_chunk


def _namespace(vllm_config: Any, kv_cache_config: Any, tp_size: int, salt: str) -> Namespace:
    model = vllm_config.model_config
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    identity = describe_namespace(
        {
            "model": model.model,
            "revision": getattr(model, "revision", None),
            "quantization": getattr(model, "quantization", None),
            "kv_dtype": str(getattr(spec, "dtype", "")),
            "page_bytes": getattr(spec, "page_size_bytes", None),
            "layers": len(kv_cache_config.kv_cache_groups[0].layer_names),
            "block_size": vllm_config.cache_config.block_size,
            "layout": getattr(vllm_config.cache_config, "kv_cache_layout", None),
        }
    )
    return Namespace(
        identity, dtype=str(getattr(spec, "dtype", "")), tp_size=tp_size, tenant_salt=salt
    )
