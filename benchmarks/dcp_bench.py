#!/usr/bin/env python3
"""torch.distributed.checkpoint (DCP) on the state ckpt_bench.cpp measures.

The same state as benchmarks/ckpt_bench.cpp: K float32 tensors [rows, 4096]
whose rows are sharded evenly over the ranks (DTensor, Shard(0), on a CPU
device mesh, Gloo), --gib GiB in all. Each round (after --warmup untimed
ones) measures, the slowest rank's time between barriers:

  * save: dcp.save with FileSystemWriter(thread_count=--io-threads), files
    fsynced (sync_files, its default);
  * load: dcp.load with FileSystemReader after the checkpoint's files were
    dropped from the page cache (posix_fadvise DONTNEED); values compared;
  * step.alone: --step-matmuls fp32 matmuls 384x384 on every rank, the
    stand-in for a training step's forward and backward pass (ckpt_bench
    passes the count it calibrated);
  * async.blocked / async.step / async.total: dcp.async_save (torch >= 2.3):
    the time the caller is blocked; the time until the same compute phase
    run right after it ends; until the returned future completes.

Prints a Markdown table (rank 0); --json FILE writes every round's numbers
(schema tessera-bench/1, as the C++ benchmarks). ckpt_bench runs this once
per round with --reps 1, so that its rounds and DCP's interleave.

  python benchmarks/dcp_bench.py --nproc 4 --gib 2 --io-threads 4   # spawns the ranks
  torchrun --nproc-per-node 4 benchmarks/dcp_bench.py --gib 2

Needs torch >= 2.0 with torch.distributed (DTensor + DCP) and numpy:
scripts/setup-bench-venv.sh makes build/bench-venv with PyPI's torch.
Without it the script prints why it is skipped and exits 0: Debian's torch
1.13 has a torch.distributed.checkpoint module, but no DTensor it can save.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

COLS = 4096


def skip(reason):
    print(f"dcp_bench: SKIPPED: {reason}", flush=True)
    sys.exit(0)


def torch_or_skip():
    try:
        import torch  # noqa: F401
    except ImportError:
        skip(f"no torch in {sys.executable}; run it with a Python that has torch >= 2.0")
    import torch
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 0):
        skip(f"torch {torch.__version__} in {sys.executable} predates DTensor and the DCP "
             "save/load API (needs torch >= 2.0)")
    import torch.distributed as dist
    if not dist.is_available():
        skip(f"torch {torch.__version__} was built without torch.distributed")
    return torch, version


def dtensor_api():
    """(DeviceMesh factory, DTensor, Shard) across torch 2.x versions."""
    try:  # torch >= 2.4
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch 2.0 - 2.3
        from torch.distributed._tensor import DTensor, Shard
    try:
        from torch.distributed.device_mesh import init_device_mesh

        def mesh(world):
            return init_device_mesh("cpu", (world,))
    except ImportError:
        from torch.distributed._tensor import DeviceMesh

        def mesh(world):
            return DeviceMesh("cpu", list(range(world)))
    return mesh, DTensor, Shard


def dcp_api(version, threads):
    """(save(state, path), load(state, path), async_save or None)."""
    import torch.distributed.checkpoint as dcp

    def writer(path):
        return dcp.FileSystemWriter(path, thread_count=threads)

    if version >= (2, 2) and hasattr(dcp, "save"):
        def save(state, path):
            dcp.save(state, storage_writer=writer(path))

        def load(state, path):
            dcp.load(state, storage_reader=dcp.FileSystemReader(path))
    else:
        def save(state, path):
            dcp.save_state_dict(state, storage_writer=writer(path))

        def load(state, path):
            dcp.load_state_dict(state, storage_reader=dcp.FileSystemReader(path))
    async_save = None
    if hasattr(dcp, "async_save"):
        def async_save(state, path):
            return dcp.async_save(state, storage_writer=writer(path))
    return save, load, async_save


def resident_fraction(path):
    """Fraction of the file's pages in the page cache (mincore), or None."""
    try:
        import ctypes
        import mmap
        size = os.path.getsize(path)
        if size == 0:
            return 0.0
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        page = os.sysconf("SC_PAGESIZE")
        pages = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            vec = (ctypes.c_ubyte * pages)()
            ok = libc.mincore(addr, size, vec) == 0
            libc.munmap(addr, size)
            return sum(v & 1 for v in vec) / pages if ok else None
        finally:
            os.close(fd)
    except (OSError, AttributeError, ValueError):
        return None


def drop_cache(path):
    """Drops a (synced) file from the page cache; returns the fraction left."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_fraction(path)


def drop_dir(path):
    worst = 0.0
    for root, _, files in os.walk(path):
        for name in files:
            f = drop_cache(os.path.join(root, name))
            worst = max(worst, f if f is not None else 0.0)
    return worst


def machine(threads):
    """The torch side's own view of the machine (ckpt_bench records the rest)."""
    import platform
    import torch
    return {"torch": torch.__version__, "python": platform.python_version(),
            "intra_op_threads": threads}


def run(rank, world, args):
    torch, version = torch_or_skip()
    import torch.distributed as dist
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // world)  # as Tessera's ranks: usable cores / local ranks
    torch.set_num_threads(threads)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=args.init_method, rank=rank, world_size=world)
    make_mesh, DTensor, Shard = dtensor_api()
    save, load, async_save = dcp_api(version, args.io_threads)
    mesh = make_mesh(world)

    total = args.gib * (1 << 30)
    rows = int(total / (args.tensors * COLS * 4))
    rows = max(world, rows // world * world)
    local_rows = rows // world
    gen = torch.Generator().manual_seed(1000 + rank)

    def state(fill):
        out = {}
        for t in range(args.tensors):
            local = (torch.rand(local_rows, COLS, generator=gen) if fill
                     else torch.zeros(local_rows, COLS))
            out[f"layers.{t:02d}.weight"] = DTensor.from_local(local, mesh, [Shard(0)],
                                                             run_check=False)
        return out

    src, dst = state(True), state(False)
    nbytes = args.tensors * rows * COLS * 4
    gb = nbytes / 1e9
    mm_a, mm_b = torch.randn(384, 384), torch.randn(384, 384)

    def compute_phase():
        acc = torch.zeros(384, 384)
        for _ in range(args.step_matmuls):
            acc.add_(mm_a @ mm_b)
        acc.sum().item()

    def slowest(seconds):
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def timed(fn):
        dist.barrier()
        t = time.perf_counter()
        fn()
        return slowest(time.perf_counter() - t)

    def equal():
        same = all(torch.equal(src[k].to_local(), dst[k].to_local()) for k in src)
        t = torch.tensor([0 if same else 1])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item() == 0

    root = args.dir
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
    dist.barrier()
    keys = ("save", "load", "step.alone", "async.blocked", "async.step", "async.total")
    series = {k: [] for k in keys}
    left_ckpt = 0.0
    ok = True
    for round_index in range(args.warmup + args.reps):
        r = {}
        sync_dir = os.path.join(root, "sync")
        r["save"] = timed(lambda: save(src, sync_dir))
        if rank == 0:
            left_ckpt = max(left_ckpt, drop_dir(sync_dir))
        for v in dst.values():
            v.to_local().zero_()
        r["load"] = timed(lambda: load(dst, sync_dir))
        ok &= equal()
        r["step.alone"] = timed(compute_phase)
        if async_save is not None:
            async_dir = os.path.join(root, "async")
            dist.barrier()
            t = time.perf_counter()
            future = async_save(src, async_dir)
            blocked = time.perf_counter() - t
            compute_phase()
            step = time.perf_counter() - t
            future.result()
            r["async.blocked"] = slowest(blocked)
            r["async.step"] = slowest(step)
            r["async.total"] = slowest(time.perf_counter() - t)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(sync_dir, ignore_errors=True)
            shutil.rmtree(os.path.join(root, "async"), ignore_errors=True)
        dist.barrier()
        if round_index >= args.warmup:
            for k, v in r.items():
                series[k].append(v)

    if rank == 0:
        def row(what, key, with_bw=True):
            v = series[key]
            if not v:
                print(f"| {what} | n/a | n/a | n/a |")
                return
            m = statistics.median(v)
            bw = f"{gb / m:.2f}" if with_bw else "—"
            print(f"| {what} | {m:.3f} | {min(v):.3f}–{max(v):.3f} | {bw} |")

        print(f"\n### dcp_bench: {world} ranks, {nbytes / (1 << 30):.3f} GiB state "
              f"({args.tensors} float32 DTensors [{rows}, {COLS}], Shard(0)), torch "
              f"{torch.__version__}, {threads} threads per rank, FileSystemWriter thread_count "
              f"{args.io_threads}, median of {args.reps} rounds after {args.warmup} warm-up\n")
        print(f"Page cache after posix_fadvise(DONTNEED), worst round: checkpoint files "
              f"{left_ckpt:.0%} still cached. GB = 1e9 bytes; times are the slowest rank's.\n")
        print("| operation | median s | range s | GB/s |\n|---|---:|---:|---:|")
        row("dcp.save (FileSystemWriter)", "save")
        row(f"dcp.load, page cache dropped (values {'equal' if ok else 'DIFFER'})", "load")
        row(f"training step alone ({args.step_matmuls} matmuls)", "step.alone", False)
        row("dcp.async_save: caller blocked" if async_save else
            "dcp.async_save: caller blocked (not in this torch)", "async.blocked")
        row("dcp.async_save: step with the save overlapping", "async.step", False)
        row("dcp.async_save: until the future completes", "async.total")
        sys.stdout.flush()
        if args.json:
            doc = {
                "schema": "tessera-bench/1", "benchmark": "dcp",
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": " ".join(sys.argv), "quick": False,
                "config": {"ranks": world, "state_bytes": nbytes, "tensors": args.tensors,
                           "tensor_shape": [rows, COLS], "writer_thread_count": args.io_threads,
                           "reader": "FileSystemReader (no thread count)",
                           "step_matmuls": args.step_matmuls, "reps": args.reps,
                           "warmup": args.warmup, "async_save": async_save is not None,
                           **machine(threads)},
                "facts": {"load_values_equal": ok, "resident_after_drop": left_ckpt},
                "series": [{"id": k, "unit": "s", "values": v, "labels": {"side": "dcp"}}
                           for k, v in series.items() if v],
            }
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
            os.replace(tmp, args.json)
    dist.barrier()
    if rank == 0 and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()
    return 0 if ok else 1


def spawned(rank, world, args):
    sys.exit(run(rank, world, args))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=2.0, help="total state over all ranks, GiB")
    p.add_argument("--tensors", type=int, default=16, help="tensors [rows, 4096] float32")
    p.add_argument("--dir", default="/tmp/tessera_dcp_bench", help="scratch directory (removed)")
    p.add_argument("--nproc", type=int, default=2,
                   help="ranks to spawn when not started by torchrun")
    p.add_argument("--io-threads", type=int, default=4,
                   help="FileSystemWriter thread_count (ckpt_bench passes its I/O threads)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds; the table shows the median")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--step-matmuls", type=int, default=100,
                   help="matmuls 384x384 of the compute phase around async_save")
    p.add_argument("--json", default="", help="write every round's numbers to this file")
    p.add_argument("--keep", action="store_true", help="leave the files in --dir")
    args = p.parse_args()
    torch_or_skip()  # before spawning anything
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        args.init_method = "env://"
        return run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    import torch.multiprocessing as mp
    rendezvous = tempfile.NamedTemporaryFile(prefix="dcp_bench_", delete=False)
    rendezvous.close()
    os.remove(rendezvous.name)
    args.init_method = "file://" + rendezvous.name
    try:
        mp.spawn(spawned, args=(args.nproc, args), nprocs=args.nproc, join=True)
    finally:
        if os.path.exists(rendezvous.name):
            os.remove(rendezvous.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
