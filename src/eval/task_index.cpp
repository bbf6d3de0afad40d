#include "tessera/eval/task_index.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <map>
#include <set>

#include "tessera/core/error.h"

namespace tessera::eval {
namespace {

namespace fs = std::filesystem;

// Task files by stem; a stem found twice keeps every path (an error only
// when that stem is asked for).
std::map<std::string, std::vector<std::string>> index_folder(const std::string& tasks_dir) {
  TESSERA_CHECK(fs::is_directory(tasks_dir), NotFound, "tasks folder '", tasks_dir,
                "' does not exist or is not a folder");
  std::map<std::string, std::vector<std::string>> index;
  for (const auto& entry : fs::recursive_directory_iterator(tasks_dir)) {
    if (!entry.is_regular_file()) continue;
    const fs::path& p = entry.path();
    if (p.extension() != ".yaml" && p.extension() != ".yml") continue;
    const std::string stem = p.stem().string();
    if (stem.empty() || stem[0] == '_') continue;
    index[stem].push_back(p.lexically_normal().string());
  }
  for (auto& [stem, paths] : index) std::sort(paths.begin(), paths.end());
  return index;
}

// "name_5shot" -> ("name", 5); nullopt without such a suffix.
std::optional<std::pair<std::string, int>> split_shots(const std::string& stem) {
  const std::string suffix = "shot";
  if (stem.size() <= suffix.size() || stem.compare(stem.size() - 4, 4, suffix) != 0) {
    return std::nullopt;
  }
  size_t digits_end = stem.size() - 4;
  size_t digits_begin = digits_end;
  while (digits_begin > 0 && std::isdigit(static_cast<unsigned char>(stem[digits_begin - 1]))) {
    --digits_begin;
  }
  if (digits_begin == digits_end || digits_begin < 2 || stem[digits_begin - 1] != '_') {
    return std::nullopt;
  }
  if (digits_end - digits_begin > 4) return std::nullopt;
  const int shots = std::stoi(stem.substr(digits_begin, digits_end - digits_begin));
  return std::make_pair(stem.substr(0, digits_begin - 1), shots);
}

const std::string& only_path(const std::string& stem, const std::vector<std::string>& paths) {
  if (paths.size() > 1) {
    std::string list;
    for (const auto& p : paths) list += (list.empty() ? "" : ", ") + p;
    TESSERA_THROW(InvalidArgument, "task '", stem, "' is defined by several files: ", list);
  }
  return paths.front();
}

}  // namespace

TaskLoadOptions TaskSelection::load_options(const std::string& data_root) const {
  TaskLoadOptions o(data_root);
  o.num_fewshot = num_fewshot;
  o.task_name = task_name;
  return o;
}

std::vector<std::string> list_tasks(const std::string& tasks_dir) {
  std::vector<std::string> out;
  for (const auto& [stem, paths] : index_folder(tasks_dir)) out.push_back(stem);
  return out;
}

std::vector<std::string> split_task_list(const std::string& text) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (begin <= text.size()) {
    size_t end = text.find(',', begin);
    if (end == std::string::npos) end = text.size();
    std::string item = text.substr(begin, end - begin);
    const size_t first = item.find_first_not_of(" \t\n");
    const size_t last = item.find_last_not_of(" \t\n");
    if (first != std::string::npos) out.push_back(item.substr(first, last - first + 1));
    begin = end + 1;
  }
  return out;
}

std::vector<TaskSelection> resolve_tasks(const std::vector<std::string>& names,
                                         const std::string& tasks_dir,
                                         std::optional<int> num_fewshot) {
  TESSERA_CHECK(!num_fewshot || *num_fewshot >= 0, InvalidArgument,
                "num_fewshot must not be negative, got ", *num_fewshot);
  const auto index = index_folder(tasks_dir);
  const int k = num_fewshot.value_or(0);

  std::vector<TaskSelection> out;
  std::set<std::string> seen;
  auto add = [&](TaskSelection s) {
    if (seen.insert(s.path).second) out.push_back(std::move(s));
  };

  // Files of `name` (rule 3) or of its group (rule 4) with `shots` examples.
  auto with_shots = [&](const std::string& name, int shots) {
    std::vector<std::pair<std::string, std::string>> found;  // (stem, path)
    for (const auto& [stem, paths] : index) {
      const auto split = split_shots(stem);
      if (!split || split->second != shots) continue;
      const std::string& base = split->first;
      if (base == name || base.rfind(name + "_", 0) == 0) {
        found.emplace_back(stem, only_path(stem, paths));
      }
    }
    // An exact N_Kshot wins over a group that merely shares the prefix.
    for (const auto& f : found) {
      if (f.first == name + "_" + std::to_string(shots) + "shot") return decltype(found){f};
    }
    return found;
  };

  for (const std::string& name : names) {
    TESSERA_CHECK(!name.empty(), InvalidArgument, "empty task name");
    // Rule 1: a file.
    if ((name.size() > 5 && (name.rfind(".yaml") == name.size() - 5)) ||
        (name.size() > 4 && (name.rfind(".yml") == name.size() - 4))) {
      TESSERA_CHECK(fs::is_regular_file(name), NotFound, "task file '", name, "' does not exist");
      add({fs::path(name).lexically_normal().string(), num_fewshot, ""});
      continue;
    }
    // Rule 2: a task by its own name.
    if (const auto it = index.find(name); it != index.end()) {
      add({only_path(name, it->second), num_fewshot, ""});
      continue;
    }
    // Rules 3 and 4.
    auto found = with_shots(name, k);
    if (!found.empty()) {
      for (const auto& [stem, path] : found) add({path, std::nullopt, ""});
      continue;
    }
    // Rule 5: another shot count, overridden.
    if (num_fewshot) {
      std::set<int> available;
      for (const auto& [stem, paths] : index) {
        const auto split = split_shots(stem);
        if (split && (split->first == name || split->first.rfind(name + "_", 0) == 0)) {
          available.insert(split->second);
        }
      }
      if (!available.empty()) {
        const int j = *available.begin();
        for (const auto& [stem, path] : with_shots(name, j)) {
          const std::string base = split_shots(stem)->first;
          add({path, k, base + "_" + std::to_string(k) + "shot"});
        }
        continue;
      }
    }
    // Nothing: list what there is (names without their shot suffix, once).
    std::set<std::string> offered;
    for (const auto& [stem, paths] : index) {
      const auto split = split_shots(stem);
      offered.insert(split ? split->first : stem);
    }
    std::string list;
    for (const auto& o : offered) list += (list.empty() ? "" : ", ") + o;
    TESSERA_THROW(NotFound, "no task named '", name, "' in ", tasks_dir, " (with ", k,
                  "-shot files); tasks there: ", list);
  }
  return out;
}

}  // namespace tessera::eval
