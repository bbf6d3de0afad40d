// tessera/core/file_io.h — small POSIX file helpers shared by the formats.
//
// FileDescriptor owns an fd; MappedFile maps a whole file read-only (shared
// by readers that hand out zero-copy tensor views); AtomicFileWriter writes
// "<path>.tmp.<pid>" with large sequential writes and publishes it by
// fsync + rename + directory fsync, so a crash or an exception never leaves
// a half-written file under the real name. throw_io_error maps errno to the
// tessera::Error code with the right retry meaning.
//
// FileDescriptor and AtomicFileWriter are move-only, not thread-safe;
// MappedFile is immutable after construction and safe to share.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tessera {

// Throws the Error whose code matches `err` (ENOENT -> NotFound, ENOSPC ->
// ResourceExhausted, EIO -> DataLoss, ...): "<what>: <strerror>".
[[noreturn]] void throw_io_error(const std::string& what, int err);

class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(FileDescriptor&& other) noexcept;
  FileDescriptor& operator=(FileDescriptor&& other) noexcept;
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor();

  int get() const { return fd_; }
  // Closes now and returns close()'s errno (0 on success): for a file just
  // written a failing close can be the only sign of lost data.
  int close_checked();

 private:
  int fd_ = -1;
};

// A whole file mapped read-only. NotFound / InvalidArgument / ... (per
// throw_io_error) when it cannot be opened; an empty file maps to size 0.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Writes a file atomically. Destroying an uncommitted writer removes the
// temporary file.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string path);
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  ~AtomicFileWriter();

  // Appends bytes; small pieces are gathered into an 8 MiB buffer, large
  // ones go straight to write().
  void append(const void* data, size_t n);
  // fsync, close, rename over the real path, fsync the directory.
  void commit();
  const std::string& path() const { return path_; }

 private:
  void flush();
  void write_all(const void* data, size_t n);

  std::string path_;
  std::string tmp_path_;
  FileDescriptor fd_;
  std::vector<uint8_t> buffer_;
  bool committed_ = false;
};

}  // namespace tessera
