// Huge-page staging buffers and the streaming copy (see host_memory.h).
#include "host_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "tessera/core/error.h"

namespace tessera::ckpt::detail {

namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// Below this, a cached copy is as fast and leaves the data in cache.
constexpr size_t kStreamMin = size_t{1} << 20;

#if defined(__x86_64__)
// Copies n bytes (a multiple of 64) to a 64-byte aligned dst.
__attribute__((target("avx512f"))) void stream_avx512(uint8_t* dst, const uint8_t* src, size_t n) {
  for (size_t i = 0; i < n; i += 256) {
    __m512i a = _mm512_loadu_si512(src + i);
    __m512i b = _mm512_loadu_si512(src + i + 64);
    __m512i c = _mm512_loadu_si512(src + i + 128);
    __m512i d = _mm512_loadu_si512(src + i + 192);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), a);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i + 64), b);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i + 128), c);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i + 192), d);
  }
  _mm_sfence();
}

__attribute__((target("avx2"))) void stream_avx2(uint8_t* dst, const uint8_t* src, size_t n) {
  for (size_t i = 0; i < n; i += 128) {
    __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 64));
    __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 96), d);
  }
  _mm_sfence();
}

enum class CopyIsa { kNone, kAvx2, kAvx512 };

CopyIsa copy_isa() {
  // A function-local constant initialised once; not mutable state.
  static const CopyIsa isa = __builtin_cpu_supports("avx512f") ? CopyIsa::kAvx512
                             : __builtin_cpu_supports("avx2")  ? CopyIsa::kAvx2
                                                               : CopyIsa::kNone;
  return isa;
}
#endif

}  // namespace

void stream_copy(void* dst_v, const void* src_v, size_t n) {
  auto* dst = static_cast<uint8_t*>(dst_v);
  const auto* src = static_cast<const uint8_t*>(src_v);
#if defined(__x86_64__)
  const CopyIsa isa = copy_isa();
  if (n >= kStreamMin && isa != CopyIsa::kNone) {
    // Head up to dst's next 64-byte boundary, a body of whole 256-byte
    // blocks with streaming stores, then the tail.
    size_t head = (64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64;
    std::memcpy(dst, src, head);
    size_t body = (n - head) / 256 * 256;
    if (isa == CopyIsa::kAvx512) {
      stream_avx512(dst + head, src + head, body);
    } else {
      stream_avx2(dst + head, src + head, body);
    }
    std::memcpy(dst + head + body, src + head + body, n - head - body);
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

HugeBuffer::HugeBuffer(size_t bytes) : size_(bytes) {
  if (bytes == 0) return;
  mapped_ = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  // Map one extra huge page so the buffer can start on a 2 MiB boundary;
  // the unaligned ends are unmapped again.
  const size_t span = mapped_ + kHugePage;
  void* raw = ::mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TESSERA_CHECK(raw != MAP_FAILED, ResourceExhausted, "checkpoint staging: cannot map ", bytes,
                " bytes of host memory: ", std::strerror(errno));
  auto* base = static_cast<uint8_t*>(raw);
  auto* aligned = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(base) + kHugePage - 1) /
                                             kHugePage * kHugePage);
  if (aligned > base) ::munmap(base, aligned - base);
  uint8_t* end = aligned + mapped_;
  if (base + span > end) ::munmap(end, base + span - end);
  data_ = aligned;
#if defined(MADV_HUGEPAGE)
  ::madvise(data_, mapped_, MADV_HUGEPAGE);  // best effort
#endif
  // Fault every page in now (one write per 4 KiB also covers 2 MiB pages),
  // so that no save pays for it while the training step waits.
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  for (size_t off = 0; off < mapped_; off += page) data_[off] = 0;
}

HugeBuffer::~HugeBuffer() {
  if (data_) ::munmap(data_, mapped_);
}

HugeBuffer::HugeBuffer(HugeBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      mapped_(std::exchange(other.mapped_, 0)) {}

HugeBuffer& HugeBuffer::operator=(HugeBuffer&& other) noexcept {
  if (this != &other) {
    if (data_) ::munmap(data_, mapped_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    mapped_ = std::exchange(other.mapped_, 0);
  }
  return *this;
}

BounceSlots::BounceSlots(size_t count, size_t slot_bytes) {
  const size_t stride = (slot_bytes + 4095) / 4096 * 4096;
  if (count == 0 || stride == 0) return;
  buffer_ = HugeBuffer(count * stride);
  for (size_t i = 0; i < count; ++i) free_.push_back(buffer_.data() + i * stride);
}

BounceSlots::Slot BounceSlots::take() {
  std::lock_guard<std::mutex> lock(mu_);
  TESSERA_CHECK(!free_.empty(), Internal, "bounce buffers: all slots are taken");
  uint8_t* data = free_.back();
  free_.pop_back();
  return Slot(this, data);
}

void BounceSlots::Slot::release() {
  if (!owner_) return;
  std::lock_guard<std::mutex> lock(owner_->mu_);
  owner_->free_.push_back(data_);
  owner_ = nullptr;
  data_ = nullptr;
}

BounceSlots::Slot::~Slot() { release(); }

BounceSlots::Slot::Slot(Slot&& other) noexcept
    : owner_(std::exchange(other.owner_, nullptr)), data_(std::exchange(other.data_, nullptr)) {}

BounceSlots::Slot& BounceSlots::Slot::operator=(Slot&& other) noexcept {
  if (this != &other) {
    release();
    owner_ = std::exchange(other.owner_, nullptr);
    data_ = std::exchange(other.data_, nullptr);
  }
  return *this;
}

}  // namespace tessera::ckpt::detail
