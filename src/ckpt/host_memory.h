// src/ckpt/host_memory.h — host memory for snapshots: huge-page staging
// buffers and a streaming copy.
//
// Why: save_async blocks the training step while it copies the state into
// a staging buffer, so that copy must run at the memory's speed. Two things
// slow a plain memcpy of gigabytes, measured on a 2-vCPU virtual machine:
//   * page faults: a fresh buffer faults on every page during the copy;
//     staging buffers are faulted in once, when allocated, and reused;
//   * address translation: with 4 KiB pages every 4 KiB costs a TLB miss
//     (expensive under nested paging); staging buffers use 2 MiB pages;
//   * cache pollution: ordinary stores read each destination line before
//     writing it; non-temporal stores skip that (16 GB/s vs 10 GB/s for one
//     thread, 4 KiB pages).
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace tessera::ckpt::detail {

// `dst` = `src` for `n` bytes (non-overlapping) with non-temporal stores
// (AVX-512 or AVX2, chosen at run time; memcpy otherwise and for small n).
// The stores are fenced before it returns.
void stream_copy(void* dst, const void* src, size_t n);

// Anonymous memory of `bytes`, 2 MiB aligned, backed by transparent huge
// pages where the kernel allows (MADV_HUGEPAGE) and faulted in before
// return, so the first copy into it does not page-fault. ResourceExhausted
// when the memory cannot be mapped.
class HugeBuffer {
 public:
  HugeBuffer() = default;
  explicit HugeBuffer(size_t bytes);
  ~HugeBuffer();
  HugeBuffer(HugeBuffer&& other) noexcept;
  HugeBuffer& operator=(HugeBuffer&& other) noexcept;
  HugeBuffer(const HugeBuffer&) = delete;
  HugeBuffer& operator=(const HugeBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;    // as requested
  size_t mapped_ = 0;  // rounded up to 2 MiB
};

// `count` equal slots of one HugeBuffer, each 4 KiB-aligned, handed out to
// the threads of an I/O pool (one slot per thread at a time) as bounce
// buffers for direct I/O. Thread-safe.
class BounceSlots {
 public:
  // A slot, returned when destroyed. Move-only.
  class Slot {
   public:
    Slot() = default;
    ~Slot();
    Slot(Slot&& other) noexcept;
    Slot& operator=(Slot&& other) noexcept;
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    uint8_t* data() const { return data_; }

   private:
    friend class BounceSlots;
    Slot(BounceSlots* owner, uint8_t* data) : owner_(owner), data_(data) {}
    void release();
    BounceSlots* owner_ = nullptr;
    uint8_t* data_ = nullptr;
  };

  BounceSlots() = default;  // no slots
  BounceSlots(size_t count, size_t slot_bytes);
  bool empty() const { return buffer_.size() == 0; }
  // A free slot; Internal when all are taken (more users than slots).
  Slot take();

 private:
  HugeBuffer buffer_;
  std::mutex mu_;
  std::vector<uint8_t*> free_;  // guarded by mu_
};

}  // namespace tessera::ckpt::detail
