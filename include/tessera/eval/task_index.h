// tessera/eval/task_index.h — task files by name, as lm-eval's --tasks finds them.
//
// A tasks folder (data/eval/tasks) holds one YAML file per task; files whose
// names start with '_' are bases that others include and are never tasks.
// A name on the command line is resolved against the file names (stems):
//
//   auto selected = resolve_tasks({"yue_gsm8k", "yue_arc_c"}, "data/eval/tasks", 5);
//   // yue_gsm8k_5shot.yaml, yue_arc_c_gen_5shot.yaml, yue_arc_c_mc_5shot.yaml
//   for (const TaskSelection& s : selected) Task::load(s.path, s.load_options(data_root));
//
// Rules, in order, for a name N and a few-shot count K (K = 0 when none is given):
//   1. N is the path of a YAML file: that file.
//   2. a task file is named N.yaml: that file.
//   3. a task file is named N_Kshot.yaml: that file.
//   4. task files named N_<variant>_Kshot.yaml: all of them (a group, e.g.
//      yue_trans = its three directions), sorted by name.
//   5. when a K was given and no file has it, rules 3 and 4 with the smallest
//      shot count J the files do have: those files, run with K examples and
//      renamed N…_Kshot (so the results never show a J-shot name for a
//      K-shot run).
// With rules 1 and 2 a given K replaces the file's num_fewshot. The same file
// named twice is selected once.
//
// Pure functions over the file system; thread-safe.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "tessera/eval/task.h"

namespace tessera::eval {

struct TaskSelection {
  std::string path;                // the YAML file
  std::optional<int> num_fewshot;  // replaces the file's, when set
  std::string task_name;           // replaces the file's, when not empty

  // TaskLoadOptions for Task::load with these overrides.
  TaskLoadOptions load_options(const std::string& data_root) const;
};

// Resolves `names` (see above). NotFound naming the name and listing the
// task names the folder offers when a name matches nothing; NotFound when
// `tasks_dir` is not a folder; InvalidArgument for an empty name or a
// negative `num_fewshot`.
std::vector<TaskSelection> resolve_tasks(const std::vector<std::string>& names,
                                         const std::string& tasks_dir,
                                         std::optional<int> num_fewshot = std::nullopt);

// Every task in `tasks_dir` (recursively): the stems of its YAML files that
// do not start with '_', sorted. NotFound when `tasks_dir` is not a folder.
std::vector<std::string> list_tasks(const std::string& tasks_dir);

// Splits "a,b , c" into {"a", "b", "c"} (empty items dropped).
std::vector<std::string> split_task_list(const std::string& text);

}  // namespace tessera::eval
