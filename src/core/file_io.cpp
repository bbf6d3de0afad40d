#include "tessera/core/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include "tessera/core/error.h"

namespace tessera {
namespace {

// Small writes are gathered so that many tiny tensors still make large
// sequential write() calls.
constexpr size_t kWriteBufferBytes = 8 << 20;

}  // namespace

void throw_io_error(const std::string& what, int err) {
  ErrorCode code = ErrorCode::kInternal;
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      code = ErrorCode::kNotFound;
      break;
    case ENOSPC:
    case EDQUOT:
    case EMFILE:
    case ENFILE:
    case ENOMEM:
      code = ErrorCode::kResourceExhausted;
      break;
    case EACCES:
    case EPERM:
    case EISDIR:
    case EROFS:
    case ENAMETOOLONG:
      code = ErrorCode::kInvalidArgument;
      break;
    case EIO:
      code = ErrorCode::kDataLoss;
      break;
    default:
      break;
  }
  throw_error(code, what + ": " + std::strerror(err));
}

FileDescriptor::FileDescriptor(FileDescriptor&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)) {}

FileDescriptor& FileDescriptor::operator=(FileDescriptor&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

FileDescriptor::~FileDescriptor() {
  if (fd_ >= 0) ::close(fd_);
}

int FileDescriptor::close_checked() {
  int rc = ::close(std::exchange(fd_, -1));
  return rc == 0 ? 0 : errno;
}

MappedFile::MappedFile(const std::string& path) {
  FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) throw_io_error("cannot open " + path, errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw_io_error("cannot stat " + path, errno);
  TESSERA_CHECK(S_ISREG(st.st_mode), InvalidArgument, path, " is not a regular file");
  size_ = static_cast<size_t>(st.st_size);
  if (size_ == 0) return;  // mmap rejects length 0
  void* addr = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (addr == MAP_FAILED) throw_io_error("cannot mmap " + path, errno);
  data_ = static_cast<const uint8_t*>(addr);
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

AtomicFileWriter::AtomicFileWriter(std::string path)
    : path_(std::move(path)), tmp_path_(path_ + ".tmp." + std::to_string(::getpid())) {
  fd_ = FileDescriptor(::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd_.get() < 0) throw_io_error("cannot create " + tmp_path_, errno);
  buffer_.reserve(kWriteBufferBytes);
}

AtomicFileWriter::~AtomicFileWriter() {
  if (!committed_) ::unlink(tmp_path_.c_str());
}

void AtomicFileWriter::append(const void* data, size_t n) {
  if (buffer_.size() + n > kWriteBufferBytes) flush();
  if (n >= kWriteBufferBytes) {
    write_all(data, n);
  } else {
    const auto* bytes = static_cast<const uint8_t*>(data);
    buffer_.insert(buffer_.end(), bytes, bytes + n);
  }
}

void AtomicFileWriter::commit() {
  flush();
  if (::fsync(fd_.get()) != 0) throw_io_error("cannot fsync " + tmp_path_, errno);
  if (int err = fd_.close_checked(); err != 0) throw_io_error("cannot close " + tmp_path_, err);
  if (::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    throw_io_error("cannot rename " + tmp_path_ + " to " + path_, errno);
  }
  committed_ = true;
  // Make the rename durable. A failure here is not worth an error: the file
  // is complete and visible, only its crash-durability is weaker.
  std::filesystem::path dir = std::filesystem::path(path_).parent_path();
  FileDescriptor dir_fd(
      ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.get() >= 0) ::fsync(dir_fd.get());
}

void AtomicFileWriter::flush() {
  if (buffer_.empty()) return;
  write_all(buffer_.data(), buffer_.size());
  buffer_.clear();
}

void AtomicFileWriter::write_all(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    ssize_t written = ::write(fd_.get(), p, std::min<size_t>(n, size_t{1} << 30));
    if (written < 0) {
      if (errno == EINTR) continue;
      throw_io_error("cannot write " + tmp_path_, errno);
    }
    p += written;
    n -= static_cast<size_t>(written);
  }
}

}  // namespace tessera
