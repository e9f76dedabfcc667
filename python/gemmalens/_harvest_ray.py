"""gl.harvest(engine="ray"): the shards of a harvest spread over a Ray Data actor pool.

The driver packs the token rows (cheap, sequential: a row's boundaries depend on every text before it) and hands one
item per shard to ``map_batches`` over an ``ActorPoolStrategy`` of ``num_workers`` actors. Each actor loads the model
once from ``model.path`` and writes whole shards (temporary name, then rename), so a shard redone after an actor died
replaces its file with identical bytes: every row is in the output exactly once. Actors are restarted and their
tasks retried by Ray (Ray Data's actor pools default to max_restarts = max_task_retries = -1: ray/data/_internal/
execution/operators/actor_pool_map_operator.py); the driver records each finished shard in the manifest
as results arrive, so a killed driver resumes like a local harvest. The token ids of the shards still to do are held
in Ray's object store for the run (4 bytes per token)."""
import os

import numpy as np


class _Worker:
    """One Ray actor: a model, the harvest plan, and a shard writer."""

    def __init__(self, spec):
        import gemmalens as gl
        from gemmalens.harvest import _TMP, _Job, _Plan

        model = gl.load(spec["path"], dtype=spec["model_dtype"], weights=spec["weights"], threads=spec["threads"],
                        max_seq_len=spec["max_seq_len"], progress=False)
        plan = _Plan(model, spec["hooks"], spec["saes"])
        if plan.dims != spec["dims"]:
            raise RuntimeError(f"the model at {spec['path']} gives hook widths {plan.dims} in this actor, "
                               f"{spec['dims']} on the driver: every node must read the same checkpoint")
        self.job = _Job(model, plan, spec["out_dir"], spec["format"], spec["dtype"], spec["T"], spec["batch_size"])
        self.T = spec["T"]
        # Which processes harvest (for operators, and for the test that kills one): removed with the harvest's tmp dir.
        d = os.path.join(spec["out_dir"], _TMP, "workers")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, str(os.getpid())), "w") as f:
            f.write(str(os.getpid()))

    def __call__(self, batch):
        out = {"shard": [], "file": [], "rows": [], "tokens_sha256": []}
        for i, raw, n in zip(batch["shard"], batch["tokens"], batch["rows"]):
            tokens = np.frombuffer(raw, np.int32).reshape(int(n), self.T)
            info = self.job.run(int(i), tokens)
            out["shard"].append(int(i))
            for k in ("file", "rows", "tokens_sha256"):
                out[k].append(info[k])
        return {k: np.asarray(v) for k, v in out.items()}


def run(model, plan, out_dir, fmt, dtype, T, batch_size, todo, done, num_workers, threads_per_worker, ray_address):
    import ray
    import ray.data

    items = [{"shard": i, "tokens": tokens.astype(np.int32).tobytes(), "rows": int(tokens.shape[0])} for i, tokens in todo]
    if not items:
        return
    started = False
    if not ray.is_initialized():
        if ray_address is None:
            ray.init(num_cpus=num_workers * threads_per_worker, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=ray_address, log_to_driver=False, configure_logging=False)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # gl.harvest shows its own bar
        spec = {"path": os.path.abspath(str(model.path)), "model_dtype": str(model.dtype), "weights": str(model.weights),
                "threads": threads_per_worker, "max_seq_len": model.max_seq_len, "hooks": plan.hooks,
                "saes": plan.saes, "dims": plan.dims, "out_dir": out_dir, "format": fmt, "dtype": dtype, "T": T,
                "batch_size": batch_size}
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        out = ds.map_batches(_Worker, fn_constructor_kwargs={"spec": spec}, batch_size=1, batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(size=num_workers), num_cpus=threads_per_worker)
        for row in out.iter_rows():
            done(int(row["shard"]), {"file": str(row["file"]), "rows": int(row["rows"]),
                                     "tokens_sha256": str(row["tokens_sha256"])})
    finally:
        if started:
            ray.shutdown()
