// tessera/ckpt/storage.h — the file operations a checkpoint needs, behind a
// small interface, so that a test can swap in a faulty or in-memory store and
// an object store can be added later (cf. LevelDB's Env).
//
//   auto storage = tessera::ckpt::Storage::local();
//   auto file = storage->create("/ckpt/step_000100.tmp-1f/rank_00000.bin");
//   file->write_at(0, bytes.data(), bytes.size());
//   file->sync();
//
// Paths are plain strings; a Storage interprets them. Every failure is a
// tessera::Error naming the path and the system's reason, with the code
// tessera::throw_io_error (core/file_io.h) gives the errno: NotFound
// (ENOENT, ENOTDIR), ResourceExhausted (ENOSPC, EDQUOT, EMFILE, ENFILE,
// ENOMEM), InvalidArgument (EACCES, EPERM, EISDIR, EROFS, ENAMETOOLONG),
// DataLoss (EIO, or a short read: the file is shorter than its metadata
// says), Internal otherwise.
//
// Implementations must be thread-safe: checkpoint I/O threads call them
// concurrently (distinct files, or distinct ranges of one file).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tessera::ckpt {

// A file open for writing at explicit offsets (pwrite), so several threads
// can fill disjoint ranges of one file at once. Closed by the destructor
// (errors at that point are lost: call close() to see them).
class WritableFile {
 public:
  virtual ~WritableFile() = default;
  // Writes all `size` bytes at `offset` (retrying short writes).
  virtual void write_at(uint64_t offset, const void* data, size_t size) = 0;
  // The alignment (bytes) of offset, size and buffer address at which
  // write_at bypasses the page cache (direct I/O: no copy into the cache,
  // far less CPU time); 0 when this file never does. Unaligned writes are
  // accepted all the same, through the cache.
  virtual size_t direct_alignment() const { return 0; }
  // Gives the file its final size and reserves the space up front, so that
  // parallel writes never extend it and a full disk shows before writing
  // (ResourceExhausted). Optional: the default does nothing.
  virtual void reserve(uint64_t bytes) { (void)bytes; }
  // Makes the written bytes durable (fsync).
  virtual void sync() = 0;
  virtual void close() = 0;
  virtual const std::string& path() const = 0;
};

// A file open for reading at explicit offsets (pread). Thread-safe.
class ReadableFile {
 public:
  virtual ~ReadableFile() = default;
  // Reads exactly `size` bytes at `offset` into `out`; DataLoss naming the
  // file, the range and the file's size when it ends first.
  virtual void read_at(uint64_t offset, size_t size, void* out) const = 0;
  // As WritableFile::direct_alignment, for read_at: aligned reads bypass
  // the page cache (the caller must then stay within the file's size).
  virtual size_t direct_alignment() const { return 0; }
  virtual uint64_t size() const = 0;
  virtual const std::string& path() const = 0;
};

class Storage {
 public:
  virtual ~Storage() = default;

  // POSIX files (open/pwrite/pread/fsync/rename) on a local or shared file
  // system (NFS, Lustre, ...). Shareable between threads and checkpoints.
  static std::shared_ptr<Storage> local();

  // Creates `path` for writing, truncating an existing file.
  virtual std::unique_ptr<WritableFile> create(const std::string& path) = 0;
  // NotFound naming the path when it does not exist.
  virtual std::unique_ptr<ReadableFile> open(const std::string& path) = 0;
  // Whole small file (metadata) at once.
  virtual std::string read_all(const std::string& path) = 0;
  // Creates `path` and missing parents; fine if it exists.
  virtual void create_dirs(const std::string& path) = 0;
  // Atomic rename (POSIX rename(2)): `to` must not be a non-empty directory.
  virtual void rename(const std::string& from, const std::string& to) = 0;
  // Makes a directory's entries (created, renamed files) durable.
  virtual void sync_dir(const std::string& path) = 0;
  // Entry names (not paths) in `dir`, sorted; NotFound if it is missing.
  virtual std::vector<std::string> list(const std::string& dir) = 0;
  virtual bool exists(const std::string& path) = 0;
  virtual bool is_dir(const std::string& path) = 0;
  // Removes a file, or a directory with everything in it; fine if missing.
  virtual void remove_all(const std::string& path) = 0;
  // Removes one file; NotFound if missing.
  virtual void remove_file(const std::string& path) = 0;
};

}  // namespace tessera::ckpt
