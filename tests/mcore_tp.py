"""Re-save a torch_dist checkpoint with REAL megatron-core at tensor-parallel N x pipeline-parallel P (gloo, CPU
processes, N x P of them).

Each rank builds its part of the GPTModel with ``tensor_model_parallel_size=N`` and
``pipeline_model_parallel_size=P`` (its stage's layers; the embedding on the first stage, the output layer on the
last), in ``dtype`` (local spec; Llama, or DeciLM through
``HeterogeneousTransformerConfig`` when the config has ``block_configs``), loads the source checkpoint with
``dist_checkpointing.load`` (default strictness) and saves it with ``dist_checkpointing.save``: the output has
the chunking a real TP=N training save has (row/column splits, SwiGLU gate/up halves per rank,
``__{rank}_{i}.distcp`` files per rank, layers spread over the stages). Several jobs share one set of processes
(spawning is the slow part).

    resave_tensor_parallel([(hf_config, src_ckpt_dir, dst_dir), ...], tp=2, pp=2, dtype="bfloat16")
"""

from __future__ import annotations

import os
import tempfile


def _worker(rank: int, tp: int, pp: int, dtype: str, init_file: str, jobs: list) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=tp * pp)
    import json

    import mcore_harness as mh
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import get_gpt_heterogeneous_layer_spec
    from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(tp, pp)
    for cfg, src, dst in jobs:
        kwargs = mh._common_config_kwargs(cfg, tp, getattr(torch, dtype))
        kwargs.update(pipeline_model_parallel_size=pp, pipeline_dtype=getattr(torch, dtype), perform_initialization=False)
        heads = cfg["num_attention_heads"]
        if cfg.get("block_configs"):
            config = HeterogeneousTransformerConfig(**kwargs, num_query_groups=heads,
                                                    ffn_hidden_size=4 * cfg["hidden_size"],
                                                    heterogeneous_layers_config_encoded_json=json.dumps(cfg))
            spec = get_gpt_heterogeneous_layer_spec(config, use_te=False)
        else:
            config = TransformerConfig(**kwargs, num_query_groups=cfg.get("num_key_value_heads") or heads,
                                       ffn_hidden_size=cfg["intermediate_size"])
            spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        model = mh._gpt_model(config, spec, cfg)
        mh.load_checkpoint(model, src, check_extra=False)
        mh.save_reference_checkpoint(model, dst)
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def resave_tensor_parallel(jobs: list, tp: int = 2, pp: int = 1, dtype: str = "float32") -> None:
    """``jobs``: ``[(hf_config, src_ckpt_dir, dst_dir), ...]``, the sources in ``dtype``."""
    import torch.multiprocessing as mp

    fd, init_file = tempfile.mkstemp(prefix="mcore_tp_pg_")
    os.close(fd)
    os.unlink(init_file)
    try:
        jobs = [(cfg, str(src), str(dst)) for cfg, src, dst in jobs]
        mp.spawn(_worker, args=(tp, pp, dtype, init_file, jobs), nprocs=tp * pp, join=True)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)


def _hybrid_worker(rank: int, tp: int, init_file: str, cfg: dict, src: str, dst: str, tokens, out: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=tp)
    from streamconv.reference import mcore
    from streamconv.reference import mcore_hybrid as mh

    model = mh.build_mamba(cfg, tp=tp, parallel_output=False, mtp=mh.has_mtp(cfg))
    mh.load(model, src, check_extra=False)  # keys are checked at TP=1; here the split pieces must land
    logits = mh.logits_of(model, tokens)
    with mh.cpu_stand_ins():
        mcore.save_reference_checkpoint(model, dst)
    if rank == 0:
        torch.save(logits, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def hybrid_tensor_parallel(cfg: dict, src, dst, tokens, tp: int = 2):
    """Nemotron-H at tensor parallel ``tp`` (gloo processes): megatron-core's MambaModel loads ``src``, returns
    the full-vocabulary logits of ``tokens`` (rank 0's), and saves itself to ``dst`` with megatron-core's writer."""
    import torch
    import torch.multiprocessing as mp

    fd, init_file = tempfile.mkstemp(prefix="mcore_tp_pg_")
    os.close(fd)
    os.unlink(init_file)
    out = str(dst) + ".logits.pt"
    try:
        mp.spawn(_hybrid_worker, args=(tp, init_file, cfg, str(src), str(dst), tokens, out), nprocs=tp, join=True)
        return torch.load(out)
    finally:
        for path in (init_file, out):
            if os.path.exists(path):
                os.unlink(path)
