"""What ``launch slurm`` checks before it submits (and in ``--dry-run``), so that a job does not
wait in the queue for hours only to fail on its first line:

* the config's files exist where the job will look (its working directory is this one):
  ``data.streams``, ``data.tokenizer`` and ``train.init_from``, one line per problem naming the
  field; local prepared data must have the training and validation splits;
* the global batch: with ``train.global_batch_size`` set, the gradient accumulation the job
  will use is derived from nodes x processes per node x micro-batch (a batch that does not divide
  is refused with the numbers); without it, the batch that the job will get is stated;
* node-local paths (``/tmp``, ``/dev/shm``, ``/scratch/local``, ...) for the run directory, the
  checkpoints, the logs and ``--chdir``: a warning, since other nodes, and a requeued job on
  another node, do not see them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# path prefixes that are local to one node on most clusters
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/scratch/local", "/local", "/localscratch",
                       "/lscratch", "/run/user")


@dataclass
class LaunchCheck:
    """The outcome of :func:`check_launch`: lines to print (``notes``) and the gradient
    accumulation the job will run with."""

    grad_accum_steps: int
    global_batch: int
    notes: list[str] = field(default_factory=list)


def node_local(path: Path) -> str | None:
    """The node-local prefix ``path`` lies under, or None."""
    text = str(path)
    for prefix in NODE_LOCAL_PREFIXES:
        if text == prefix or text.startswith(prefix + "/"):
            return prefix
    return None


def _abs(path: str | Path, workdir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else workdir / p


def check_data_paths(cfg, workdir: Path) -> None:
    """FileNotFoundError / ValueError (one line naming the config field) when a local data
    stream, the tokenizer or ``train.init_from`` is missing, or a local stream lacks a split."""
    from miras_pretrain.data.manifest import MANIFEST_NAME, is_remote
    from miras_pretrain.train.config import resolve_data_config

    data = resolve_data_config(cfg)  # one-line ConfigError for an empty or bad data section
    local = True
    for i, stream in enumerate(data.streams):
        if is_remote(stream.path):
            local = False  # the login node may not reach the bucket; the trainer checks it
            continue
        root = _abs(stream.path, workdir)
        if not root.is_dir():
            raise FileNotFoundError(f"data.streams[{i}] {stream.path}: not found (from {workdir}); prepare it "
                                    f"with `miras-pretrain data prepare --out {stream.path}` or fix the path")
        if not (root / MANIFEST_NAME).is_file():
            raise FileNotFoundError(f"data.streams[{i}] {stream.path}: no {MANIFEST_NAME}, not a prepared dataset; "
                                    f"prepare it with `miras-pretrain data prepare`")
    if data.tokenizer is not None and not _abs(data.tokenizer, workdir).is_file():
        raise FileNotFoundError(f"data.tokenizer {data.tokenizer}: not found (from {workdir}); give the "
                                f"sentencepiece .model the data was prepared with")
    if cfg.train.init_from:
        from miras_pretrain.train.setup import check_init_from

        check_init_from(str(_abs(cfg.train.init_from, workdir)))
    if local:
        # the manifests: splits present, one tokenizer, layout and seq_len as configured
        from miras_pretrain.data.loader import check_manifests

        check_manifests(data, data.train_split)
        check_manifests(data, data.eval_split)


def check_batch(cfg, world_size: int) -> LaunchCheck:
    """The job's gradient accumulation and global batch on ``world_size`` processes
    (ValueError with the numbers when they do not fit)."""
    from miras_pretrain.train.config import derived_grad_accum

    par, t = cfg.parallel, cfg.train
    model_par = par.tensor_parallel_size * par.pipeline_parallel_size * par.context_parallel_size
    if world_size % model_par:
        raise ValueError(f"{world_size} processes (nodes x processes per node) is not a multiple of "
                         f"tensor x pipeline x context parallel = {model_par}: change --nodes/--gpus-per-node "
                         f"or the parallel section")
    dp = world_size // model_par
    accum = derived_grad_accum(cfg, world_size)
    batch = t.micro_batch_size * accum * dp
    line = (f"global batch: {batch} sequences = train.micro_batch_size {t.micro_batch_size} x "
            f"grad_accum_steps {accum} x {dp} data-parallel ranks")
    if t.global_batch_size is None:
        line += (f" (train.global_batch_size is not set, so the batch scales with the GPU count; set it to "
                 f"keep it fixed)")
    elif accum != t.grad_accum_steps:
        line += f" (train.global_batch_size {t.global_batch_size}; config's grad_accum_steps {t.grad_accum_steps})"
    return LaunchCheck(grad_accum_steps=accum, global_batch=batch, notes=[line])


def node_local_warnings(cfg, workdir: Path, log_dir: Path) -> list[str]:
    """One warning per run path (run.out_dir, checkpoint.dir, --log-dir, --chdir) on a node-local
    filesystem."""
    paths = [("--chdir (the submitting directory)", workdir), ("run.out_dir", _abs(cfg.run.out_dir, workdir)),
             ("checkpoint.dir", _abs(cfg.checkpoint_dir, workdir)), ("--log-dir", log_dir)]
    out: list[str] = []
    warned: list[Path] = []  # run paths warned about (not --chdir)
    for i, (what, path) in enumerate(paths):
        prefix = node_local(path.resolve() if path.exists() else path)
        if prefix is None:
            continue
        if i > 0:
            # one line per tree: checkpoints and logs under a node-local run directory say nothing new
            if any(path == w or w in path.parents for w in warned):
                continue
            warned.append(path)
        out.append(f"warning: {what} {path} is under {prefix}, node-local on most clusters: the other nodes and a "
                   f"requeued job on another node will not see it; use a shared filesystem path")
    return out


def check_launch(cfg, *, world_size: int, workdir: Path, log_dir: Path) -> LaunchCheck:
    """Every submit-time check; raises on the first error, returns the notes and warnings."""
    check_data_paths(cfg, workdir)
    result = check_batch(cfg, world_size)
    result.notes += node_local_warnings(cfg, workdir, log_dir)
    return result
