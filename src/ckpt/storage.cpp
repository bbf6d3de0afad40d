// Local POSIX storage: one fd per open file (tessera::FileDescriptor),
// pread/pwrite so I/O threads share a file without a seek position.
#include "tessera/ckpt/storage.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "tessera/core/error.h"
#include "tessera/core/file_io.h"

namespace tessera::ckpt {
namespace {

// "<what> '<path>': <reason>", with the code tessera::throw_io_error gives
// the errno (NotFound, ResourceExhausted, InvalidArgument, DataLoss, ...).
[[noreturn]] void throw_errno(int err, const std::string& what, const std::string& path) {
  throw_io_error(what + " '" + path + "'", err);
}

// Data files are written through two descriptors of the same file: one
// opened with O_DIRECT (when the file system allows it) for writes aligned
// to kDirectAlignment, the other for everything else. The kernel keeps the
// two coherent; fsync on either covers the whole file.
// 4 KiB: the logical block size of common disks is 512 B or 4 KiB.
constexpr size_t kDirectAlignment = 4096;

class PosixWritableFile : public WritableFile {
 public:
  PosixWritableFile(std::string path, FileDescriptor fd, FileDescriptor direct)
      : path_(std::move(path)), fd_(std::move(fd)), direct_(std::move(direct)) {}
  void write_at(uint64_t offset, const void* data, size_t size) override {
    const char* p = static_cast<const char*>(data);
    bool aligned = direct_.get() >= 0 && !direct_refused_.load() &&
                   offset % kDirectAlignment == 0 && size % kDirectAlignment == 0 &&
                   reinterpret_cast<uintptr_t>(p) % kDirectAlignment == 0;
    while (size > 0) {
      // Linux writes at most ~2 GiB per call.
      size_t n = std::min<size_t>(size, size_t{1} << 30);
      ssize_t w = ::pwrite(aligned ? direct_.get() : fd_.get(), p, n, static_cast<off_t>(offset));
      if (w < 0) {
        if (errno == EINTR) continue;
        if (aligned && errno == EINVAL) {
          // The file system opened the file for direct I/O but refuses
          // this write (a larger alignment, or none at all): go on
          // through the page cache.
          direct_refused_ = true;
          aligned = false;
          continue;
        }
        throw_errno(errno, "writing", path_);
      }
      p += w;
      offset += static_cast<uint64_t>(w);
      size -= static_cast<size_t>(w);
    }
  }
  size_t direct_alignment() const override {
    return direct_.get() >= 0 && !direct_refused_.load() ? kDirectAlignment : 0;
  }
  void reserve(uint64_t bytes) override {
    int err = ::posix_fallocate(fd_.get(), 0, static_cast<off_t>(bytes));
    // File systems without fallocate (EOPNOTSUPP, EINVAL) simply grow the
    // file as it is written.
    if (err != 0 && err != EOPNOTSUPP && err != EINVAL) {
      throw_errno(err, "reserving " + std::to_string(bytes) + " bytes for", path_);
    }
  }
  void sync() override {
    if (::fsync(fd_.get()) != 0) throw_errno(errno, "fsync of", path_);
  }
  void close() override {
    if (direct_.get() >= 0) {
      if (int err = direct_.close_checked(); err != 0) throw_errno(err, "closing", path_);
    }
    if (fd_.get() < 0) return;  // already closed
    // NFS reports write errors at close.
    if (int err = fd_.close_checked(); err != 0) throw_errno(err, "closing", path_);
  }
  const std::string& path() const override { return path_; }

 private:
  std::string path_;
  FileDescriptor fd_;
  FileDescriptor direct_;                    // -1 where O_DIRECT is refused (tmpfs, some FUSE)
  std::atomic<bool> direct_refused_{false};  // a direct write failed with EINVAL
};

// Like PosixWritableFile: reads whose offset, size and address are aligned
// go through a second, O_DIRECT descriptor where the file system allows it.
class PosixReadableFile : public ReadableFile {
 public:
  PosixReadableFile(std::string path, FileDescriptor fd, FileDescriptor direct, uint64_t size)
      : path_(std::move(path)), fd_(std::move(fd)), direct_(std::move(direct)), size_(size) {}
  void read_at(uint64_t offset, size_t size, void* out) const override {
    char* p = static_cast<char*>(out);
    bool aligned = direct_.get() >= 0 && !direct_refused_.load() &&
                   offset % kDirectAlignment == 0 && size % kDirectAlignment == 0 &&
                   reinterpret_cast<uintptr_t>(p) % kDirectAlignment == 0;
    const uint64_t begin = offset;
    while (size > 0) {
      size_t n = std::min<size_t>(size, size_t{1} << 30);
      ssize_t r = ::pread(aligned ? direct_.get() : fd_.get(), p, n, static_cast<off_t>(offset));
      if (r < 0) {
        if (errno == EINTR) continue;
        if (aligned && errno == EINVAL) {  // as in PosixWritableFile::write_at
          direct_refused_ = true;
          aligned = false;
          continue;
        }
        throw_errno(errno, "reading", path_);
      }
      if (r == 0) {
        TESSERA_THROW(DataLoss, "file '", path_, "' is truncated: reading bytes [", begin, ", ",
                      begin + (offset - begin) + size, ") but the file has ", size_, " bytes");
      }
      p += r;
      offset += static_cast<uint64_t>(r);
      size -= static_cast<size_t>(r);
    }
  }
  size_t direct_alignment() const override { return direct_.get() >= 0 ? kDirectAlignment : 0; }
  uint64_t size() const override { return size_; }
  const std::string& path() const override { return path_; }

 private:
  std::string path_;
  FileDescriptor fd_;
  FileDescriptor direct_;                            // -1 where O_DIRECT is refused
  mutable std::atomic<bool> direct_refused_{false};  // a direct read failed with EINVAL
  uint64_t size_;
};

class PosixStorage : public Storage {
 public:
  std::unique_ptr<WritableFile> create(const std::string& path) override {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw_errno(errno, "creating", path);
    FileDescriptor direct(::open(path.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC));
    return std::make_unique<PosixWritableFile>(path, FileDescriptor(fd), std::move(direct));
  }
  std::unique_ptr<ReadableFile> open(const std::string& path) override {
    FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) throw_errno(errno, "opening", path);
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) throw_errno(errno, "stat of", path);
    const auto size = static_cast<uint64_t>(st.st_size);
    FileDescriptor direct(::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC));
    return std::make_unique<PosixReadableFile>(path, std::move(fd), std::move(direct), size);
  }
  std::string read_all(const std::string& path) override {
    auto file = open(path);
    std::string text(file->size(), '\0');
    file->read_at(0, text.size(), text.data());
    return text;
  }
  void create_dirs(const std::string& path) override {
    std::error_code ec;
    std::filesystem::create_directories(path, ec);
    if (ec) throw_errno(ec.value(), "creating directory", path);
  }
  void rename(const std::string& from, const std::string& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0) {
      throw_errno(errno, "renaming '" + from + "' to", to);
    }
  }
  void sync_dir(const std::string& path) override {
    FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (fd.get() < 0) throw_errno(errno, "opening directory", path);
    if (::fsync(fd.get()) != 0) throw_errno(errno, "fsync of directory", path);
  }
  std::vector<std::string> list(const std::string& dir) override {
    std::vector<std::string> names;
    std::error_code ec;
    std::filesystem::directory_iterator it(dir, ec);
    if (ec) throw_errno(ec.value(), "listing", dir);
    for (const auto& entry : it) names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }
  bool exists(const std::string& path) override {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0;
  }
  bool is_dir(const std::string& path) override {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
  }
  void remove_all(const std::string& path) override {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    if (ec) throw_errno(ec.value(), "removing", path);
  }
  void remove_file(const std::string& path) override {
    if (::unlink(path.c_str()) != 0) throw_errno(errno, "removing", path);
  }
};

}  // namespace

std::shared_ptr<Storage> Storage::local() { return std::make_shared<PosixStorage>(); }

}  // namespace tessera::ckpt
