// src/ckpt/roots.cpp — checkpoint roots: the step_<N> directories under a
// root, listing the complete ones, and retention (keep the newest N).
#include <algorithm>
#include <iomanip>
#include <sstream>

#include "checkpoint_internal.h"
#include "tessera/ckpt/checkpoint.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"

namespace tessera::ckpt {

using detail::strip_slash;

std::string step_dir(const std::string& root, int64_t step) {
  std::ostringstream out;
  out << strip_slash(root) << "/step_" << std::setw(9) << std::setfill('0') << step;
  return out.str();
}

std::vector<std::string> list_checkpoints(const std::string& root_in,
                                          const std::shared_ptr<Storage>& storage) {
  auto st = storage ? storage : Storage::local();
  const std::string root = strip_slash(root_in);
  if (!st->is_dir(root)) return {};
  std::vector<std::pair<int64_t, std::string>> found;
  for (const auto& name : st->list(root)) {
    if (name.rfind("step_", 0) != 0 || name.size() == 5) continue;
    if (!std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      continue;  // "step_100.tmp-..." and "step_100.old-..." are not checkpoints
    }
    const std::string path = root + "/" + name;
    if (!st->exists(path + "/" + kMetadataFile)) continue;
    found.emplace_back(std::stoll(name.substr(5)), path);
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(std::move(f.second));
  return out;
}

std::optional<std::string> latest(const std::string& root,
                                  const std::shared_ptr<Storage>& storage) {
  auto all = list_checkpoints(root, storage);
  if (all.empty()) return std::nullopt;
  return all.back();
}

void apply_retention(const std::string& root, int keep_last,
                     const std::shared_ptr<Storage>& storage) {
  TESSERA_CHECK(keep_last >= 1, InvalidArgument, "checkpoint retention in '", root,
                "': keep_last must be at least 1, got ", keep_last);
  auto st = storage ? storage : Storage::local();
  auto all = list_checkpoints(root, st);
  if (static_cast<int>(all.size()) <= keep_last) return;
  for (size_t i = 0; i + keep_last < all.size(); ++i) {
    // Metadata first: from then on the directory is no checkpoint at all.
    st->remove_file(all[i] + "/" + kMetadataFile);
    st->sync_dir(all[i]);
    st->remove_all(all[i]);
    TESSERA_LOG(Info, "ckpt") << "removed old checkpoint '" << all[i] << "' (keep_last "
                              << keep_last << ")";
  }
}

}  // namespace tessera::ckpt
