#!/usr/bin/env python3
"""torch.distributed.checkpoint (DCP) on the state ckpt_bench.cpp measures.

The same state as benchmarks/ckpt_bench.cpp: K float32 tensors [rows, 4096]
whose rows are sharded evenly over the ranks (DTensor, Shard(0), on a CPU
device mesh, Gloo), --gib GiB in all. Prints a Markdown table (rank 0) with
the same rows where DCP has them:

  * sequential write / read: rank 0 alone writes one file the size of the
    state with 16 MiB writes + fsync, drops it from the page cache
    (posix_fadvise DONTNEED) and reads it back;
  * dcp.save (synchronous), dcp.load after the checkpoint files were dropped
    from the page cache (values compared);
  * dcp.async_save (torch >= 2.3): time the caller is blocked, and until the
    returned future completes.

Times are the slowest rank's, between barriers; GB = 1e9 bytes; median of
--repeat rounds.

  python3 benchmarks/dcp_bench.py --nproc 4 --gib 2          # spawns the ranks
  torchrun --nproc-per-node 4 benchmarks/dcp_bench.py --gib 2

Needs torch >= 2.0 with torch.distributed (DTensor + DCP) and numpy, e.g.
`python3 -m pip install torch==2.5.1 numpy` into the pip interpreter (PyPI's
wheel; the measurements in docs/benchmarks.md used 2.5.1). Without it the
script prints why it is skipped and exits 0: Debian's torch 1.13 has a
torch.distributed.checkpoint module, but no DTensor it can save.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

COLS = 4096
IO_BYTES = 16 << 20


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


def dcp_api(version):
    """(save(state, path), load(state, path), async_save or None)."""
    import torch.distributed.checkpoint as dcp
    if version >= (2, 2) and hasattr(dcp, "save"):
        def save(state, path):
            dcp.save(state, storage_writer=dcp.FileSystemWriter(path))

        def load(state, path):
            dcp.load(state, storage_reader=dcp.FileSystemReader(path))
    else:
        def save(state, path):
            dcp.save_state_dict(state, storage_writer=dcp.FileSystemWriter(path))

        def load(state, path):
            dcp.load_state_dict(state, storage_reader=dcp.FileSystemReader(path))
    async_save = None
    if hasattr(dcp, "async_save"):
        def async_save(state, path):
            return dcp.async_save(state, storage_writer=dcp.FileSystemWriter(path))
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


def sequential(path, size):
    """Rank 0 alone: write `size` bytes (16 MiB writes, fsync), drop, read."""
    block = bytes((i * 2654435761 >> 13) & 0xFF for i in range(4096)) * (IO_BYTES // 4096)
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    done = 0
    while done < size:
        done += os.write(fd, memoryview(block)[: min(len(block), size - done)])
    os.fsync(fd)
    os.close(fd)
    write_s = time.perf_counter() - t
    left = drop_cache(path)
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(IO_BYTES)
    while os.readv(fd, [buf]) > 0:
        pass
    os.close(fd)
    read_s = time.perf_counter() - t
    os.remove(path)
    return write_s, read_s, left


def run(rank, world, args):
    torch, version = torch_or_skip()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=args.init_method, rank=rank, world_size=world)
    make_mesh, DTensor, Shard = dtensor_api()
    save, load, async_save = dcp_api(version)
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
    rows_out = {k: [] for k in ("seq_w", "seq_r", "save", "load", "blocked", "async")}
    left_seq = left_ckpt = 0.0
    ok = True
    for _ in range(args.repeat):
        if rank == 0:
            w, r, left = sequential(os.path.join(root, "sequential.bin"), nbytes)
            rows_out["seq_w"].append(w)
            rows_out["seq_r"].append(r)
            left_seq = max(left_seq, left or 0.0)
        dist.barrier()
        sync_dir = os.path.join(root, "sync")
        rows_out["save"].append(timed(lambda: save(src, sync_dir)))
        if rank == 0:
            left_ckpt = max(left_ckpt, drop_dir(sync_dir))
        for v in dst.values():
            v.to_local().zero_()
        rows_out["load"].append(timed(lambda: load(dst, sync_dir)))
        ok &= equal()
        if async_save is not None:
            async_dir = os.path.join(root, "async")
            dist.barrier()
            t = time.perf_counter()
            future = async_save(src, async_dir)
            blocked = time.perf_counter() - t
            future.result()
            rows_out["blocked"].append(slowest(blocked))
            rows_out["async"].append(slowest(time.perf_counter() - t))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(sync_dir, ignore_errors=True)
            shutil.rmtree(os.path.join(root, "async"), ignore_errors=True)
        dist.barrier()

    if rank == 0:
        med = {k: statistics.median(v) for k, v in rows_out.items() if v}
        rng = {k: (min(v), max(v)) for k, v in rows_out.items() if v}
        seq_w, seq_r = gb / med["seq_w"], gb / med["seq_r"]

        def row(what, key, ref):
            if key not in med:
                print(f"| {what} | n/a | n/a | n/a | n/a |")
                return
            m = med[key]
            vs = f"{gb / m / ref:.2f}" if ref else "—"
            print(f"| {what} | {m:.3f} | {rng[key][0]:.3f}–{rng[key][1]:.3f} | {gb / m:.2f} | {vs} |")

        print(f"\n### dcp_bench: {world} ranks, {nbytes / (1 << 30):.2f} GiB state "
              f"({args.tensors} float32 DTensors [{rows}, {COLS}], Shard(0)), torch "
              f"{torch.__version__}, median of {args.repeat} rounds\n")
        print(f"Page cache after posix_fadvise(DONTNEED), worst round: sequential file "
              f"{left_seq:.0%}, checkpoint files {left_ckpt:.0%} still cached. "
              "GB = 1e9 bytes; times are the slowest rank's.\n")
        print("| operation | median s | range s | GB/s | vs sequential |\n|---|---:|---:|---:|---:|")
        row("sequential write: 1 file, 16 MiB writes + fsync (rank 0 alone)", "seq_w", seq_w)
        row("sequential read: same file, page cache dropped", "seq_r", seq_r)
        row("dcp.save (FileSystemWriter)", "save", seq_w)
        row(f"dcp.load, page cache dropped (values {'equal' if ok else 'DIFFER'})", "load", seq_r)
        row("dcp.async_save: caller blocked" if async_save else
            "dcp.async_save: caller blocked (not in this torch)", "blocked", 0)
        row("dcp.async_save: until the future completes", "async", seq_w)
        sys.stdout.flush()
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
    p.add_argument("--repeat", type=int, default=3, help="rounds; the table shows the median")
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
