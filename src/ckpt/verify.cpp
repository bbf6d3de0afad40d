// src/ckpt/verify.cpp — verify: every data file's size and every block's
// and RNG blob's checksum, checked against the metadata without loading.
#include <algorithm>
#include <mutex>

#include "checkpoint_internal.h"
#include "crc32c.h"
#include "tessera/ckpt/checkpoint.h"
#include "tessera/core/error.h"
#include "tessera/core/thread_pool.h"

namespace tessera::ckpt {

using detail::blocks_of;
using detail::crc32c;
using detail::strip_slash;

namespace {

using ::tessera::detail::concat;

// One run of verify over the checkpoint at `dir`. The caller's thread opens
// the files, queues one check per saved box on the I/O pool and checks the
// RNG blobs; problem() and the byte count are also called from the pool.
class Verification {
 public:
  Verification(std::string dir, std::shared_ptr<Storage> storage)
      : dir_(std::move(dir)), storage_(std::move(storage)), meta_(read_metadata(dir_, storage_)) {}

  VerifyReport run(size_t io_threads) {
    open_files();
    ThreadPool pool(std::max<size_t>(1, io_threads));
    std::vector<std::future<void>> done;
    for (const auto& [name, tm] : meta_.tensors) {
      for (const auto& sb : tm.boxes) {
        ++report_.boxes;
        auto it = files_.find(sb.file);
        if (it == files_.end()) {
          problem(concat("tensor '", name, "' box ", sb.box.to_string(), ": data file '", sb.file,
                         "' is missing"));
          continue;
        }
        const ReadableFile* file = it->second.get();
        done.push_back(
            pool.submit([this, file, name = name, sbp = &sb] { check_box(*file, name, *sbp); }));
      }
    }
    check_rank_state();
    for (auto& f : done) f.get();
    std::sort(report_.errors.begin(), report_.errors.end());
    return report_;
  }

 private:
  void problem(std::string text) {
    std::lock_guard<std::mutex> lock(mu_);
    report_.errors.push_back(std::move(text));
  }

  // Opens every data file the metadata lists and checks its size.
  void open_files() {
    for (const auto& f : meta_.files) {
      try {
        auto file = storage_->open(dir_ + "/" + f.name);
        if (file->size() != f.bytes) {
          problem(concat("'", f.name, "' has ", file->size(), " bytes; the metadata says ", f.bytes,
                         (file->size() < f.bytes ? " (truncated)" : "")));
        }
        files_[f.name] = std::move(file);
        ++report_.files;
      } catch (const std::exception& e) {
        problem(concat("data file '", f.name, "' cannot be opened: ", e.what()));
      }
    }
  }

  // Reads box `b` of tensor `name` in steps of whole checksum blocks (about
  // 32 MiB) and checks each block's CRC-32C. Runs on the I/O pool.
  void check_box(const ReadableFile& file, const std::string& name, const SavedBox& b) {
    const uint64_t block = meta_.checksum_block;
    if (b.crc32c.size() != static_cast<size_t>(blocks_of(b.byte_length, block))) {
      problem(concat("tensor '", name, "' box ", b.box.to_string(),
                     ": wrong number of checksums in the metadata"));
      return;
    }
    const uint64_t step = std::max<uint64_t>(block, (uint64_t{32} << 20) / block * block);
    auto buf = std::make_unique<uint8_t[]>(std::min(step, std::max<uint64_t>(b.byte_length, 1)));
    for (uint64_t off = 0; off < b.byte_length; off += step) {
      const uint64_t n = std::min(step, b.byte_length - off);
      try {
        file.read_at(b.byte_offset + off, n, buf.get());
      } catch (const std::exception& e) {
        problem(concat("tensor '", name, "' box ", b.box.to_string(), ": ", e.what()));
        return;
      }
      for (uint64_t k = 0; k < n; k += block) {
        const uint64_t len = std::min(block, n - k);
        const uint32_t got = crc32c(buf.get() + k, len);
        const uint32_t want = b.crc32c[(off + k) / block];
        if (got != want) {
          problem(concat("checksum mismatch in '", b.file, "' at bytes [", b.byte_offset + off + k,
                         ", ", b.byte_offset + off + k + len, ") of tensor '", name, "' box ",
                         b.box.to_string()));
        }
      }
      std::lock_guard<std::mutex> lock(mu_);
      report_.bytes += n;
    }
  }

  // Each saving rank's RNG blob against its checksum.
  void check_rank_state() {
    for (size_t r = 0; r < meta_.rank_state.size(); ++r) {
      const RankBlob& rb = meta_.rank_state[r];
      auto it = files_.find(rb.file);
      if (it == files_.end()) continue;  // reported by open_files
      try {
        std::string blob(rb.byte_length, '\0');
        it->second->read_at(rb.byte_offset, rb.byte_length, blob.data());
        if (crc32c(blob.data(), blob.size()) != rb.crc32c) {
          problem(concat("checksum mismatch in the RNG state of rank ", r, " in '", rb.file, "'"));
        }
      } catch (const std::exception& e) {
        problem(concat("RNG state of rank ", r, ": ", e.what()));
      }
    }
  }

  const std::string dir_;
  const std::shared_ptr<Storage> storage_;
  const Metadata meta_;
  std::map<std::string, std::unique_ptr<ReadableFile>> files_;  // read-only once run() queues
  std::mutex mu_;
  // errors and bytes guarded by mu_; files and boxes: the caller's thread.
  VerifyReport report_;
};

}  // namespace

VerifyReport verify(const std::string& dir_in, const std::shared_ptr<Storage>& storage,
                    size_t io_threads) {
  auto st = storage ? storage : Storage::local();
  return Verification(strip_slash(dir_in), st).run(io_threads);
}

}  // namespace tessera::ckpt
