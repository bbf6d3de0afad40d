// One rank of a checkpoint job, run by tests/ckpt/ckpt_launch_test.cpp under
// tessera-launch. Modes:
//
//   save ROOT STEP TYPE TP EP DP [KILL_RANK]
//       a model of TYPE (llama | mixtral) on a (dp, ep, tp) mesh, weights from
//       init_random(kSeed), ZeRO-1 flat optimizer state (dp > 1) or plain
//       per-parameter state, saved at step_dir(ROOT, STEP). With KILL_RANK,
//       that rank dies (_exit) after writing its data file, before the commit.
//   load DIR TYPE TP EP DP
//       loads DIR into a fresh model and optimizer state of that layout and
//       checks every local tensor bit for bit against the reference.
//   train ROOT DATA TP DP ZERO1 FIRST LAST SAVE_AT
//       trains a llama model (fp32, init_random(kSeed)) with nn::Trainer on
//       a tp x dp mesh (ZeRO1 = 1: ZeRO-1 AdamW) over the token file DATA,
//       steps [FIRST, LAST) of a kTrainSteps-step schedule, global batch
//       kGlobalBatch split over dp. FIRST > 0 resumes from latest(ROOT)
//       (model, AdamW state, step, data position), whatever layout saved it.
//       FIRST > 0 loads step_dir(ROOT, FIRST) when it exists.
//       SAVE_AT > 0: two saves while training goes on. Before step
//       SAVE_AT - 1, save_async copies the state and training continues
//       (waited for after that step). Before step SAVE_AT, save_async with
//       defer_copy writes from the live tensors; the trainer's
//       before_update hook releases them inside that step, before the
//       optimiser changes them (waited for at the end). Rank 0 prints
//       "ckpt-loss <step> <loss>" per step (%.17g).
//
// Exit code 0 on success; a failed check prints what differs and exits 1;
// a bad command line exits 2 (--help lists the modes), any other error 3.
#include <ATen/ATen.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <optional>

#include "command_line.h"
#include "tessera/ckpt/checkpoint.h"
#include "tessera/ckpt_nn/model_state.h"
#include "tessera/core/runtime.h"
#include "tessera/dist/device_mesh.h"
#include "tessera/dist/redistribute.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/nn/model.h"
#include "tessera/nn/train.h"

namespace fs = std::filesystem;

namespace {

using namespace tessera;

constexpr uint64_t kSeed = 1234;

nn::ModelConfig tiny(const std::string& type) {
  nn::ModelConfig c;
  c.model_type = type;
  c.vocab_size = 101;  // uneven vocabulary shards
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;  // tp up to 4
  if (type == "mixtral") {
    c.num_experts = 4;
    c.num_experts_per_tok = 2;
  }
  return c;
}

// The optimizer state the test saves: a fixed function of the full
// parameter, so every layout's expected values are known.
at::Tensor fake_state(const at::Tensor& param, const std::string& key) {
  return key == "exp_avg" ? param * 2 + 1 : param * param + 0.5;
}

struct Job {
  std::shared_ptr<dist::ProcessGroup> world;
  std::unique_ptr<nn::Transformer> model;
  ckpt::ModelState where;
};

Job make_job(const std::string& type, int tp, int ep, int dp) {
  Job job;
  job.world = dist::init_process_group();
  auto mesh = dist::DeviceMesh::create(job.world, {{"dp", dp}, {"ep", ep}, {"tp", tp}});
  nn::ParallelGroups groups{tp > 1 ? mesh.group("tp") : nullptr,
                            ep > 1 ? mesh.group("ep") : nullptr};
  job.model = std::make_unique<nn::Transformer>(tiny(type), groups);
  job.where = {static_cast<int>(mesh.coord("dp")), dp};
  return job;
}

// Full reference weights of the model.
std::map<std::string, at::Tensor> reference(const std::string& type) {
  nn::Transformer single(tiny(type));
  single.init_random(kSeed);
  std::map<std::string, at::Tensor> m;
  for (const auto& [name, t] : single.named_parameters()) m[name] = t.detach().clone();
  return m;
}

// This rank's ZeRO-1 slice of fake_state over its local parameters.
at::Tensor zero1_slice(const nn::Transformer& model, const ckpt::ModelState& where,
                       const std::string& key) {
  std::vector<at::Tensor> flat;
  for (const auto& [name, t] : model.named_parameters()) {
    flat.push_back(fake_state(t.detach(), key).reshape({-1}));
  }
  at::Tensor all = at::cat(flat);
  const int64_t shard = (all.numel() + where.dp_size - 1) / where.dp_size;
  all = at::cat({all, at::zeros({shard * where.dp_size - all.numel()})});
  return all.narrow(0, where.dp_rank * shard, shard).clone();
}

void add_optimizer_state(ckpt::State& st, const Job& job, bool fill) {
  const std::vector<std::string> keys{"exp_avg", "exp_avg_sq"};
  if (job.where.dp_size > 1) {
    std::map<std::string, at::Tensor> flat;
    for (const auto& k : keys) {
      at::Tensor s = zero1_slice(*job.model, job.where, k);
      flat[k] = fill ? s : at::full_like(s, -7);
    }
    ckpt::add_zero1_optimizer(st, *job.model, job.where, flat);
  } else {
    std::map<std::string, std::vector<at::Tensor>> per;
    for (const auto& k : keys) {
      for (const auto& [name, t] : job.model->named_parameters()) {
        per[k].push_back(fill ? fake_state(t.detach(), k) : at::full_like(t.detach(), -7));
      }
    }
    ckpt::add_optimizer(st, *job.model, job.where, per);
  }
}

int save_mode(const std::string& root, int64_t step, const std::string& type, int tp, int ep,
              int dp, int kill_rank) {
  Job job = make_job(type, tp, ep, dp);
  job.model->init_random(kSeed);
  ckpt::State st;
  ckpt::add_model(st, *job.model, job.where);
  add_optimizer_state(st, job, true);
  st.step = step;
  st.data_position = step * 64;
  st.rng["cpu"] = "rank" + std::to_string(job.world->rank());
  ckpt::SaveOptions opts;
  opts.io_threads = 2;
  opts.checksum_block = 256;
  const int me = job.world->rank();
  if (kill_rank >= 0) {
    opts.on_phase = [me, kill_rank](ckpt::SavePhase p) {
      if (p == ckpt::SavePhase::kFileWritten && me == kill_rank) {
        std::cerr << "rank " << me << ": dying in the middle of the save\n";
        _exit(9);
      }
    };
  }
  ckpt::Checkpointer ck;
  ckpt::SaveHandle h = ck.save_async(ckpt::step_dir(root, step), st, job.world, opts);
  h.wait();
  job.world->barrier().wait();
  return 0;
}

int load_mode(const std::string& dir, const std::string& type, int tp, int ep, int dp) {
  Job job = make_job(type, tp, ep, dp);
  const int rank = job.world->rank();
  ckpt::State st;
  ckpt::add_model(st, *job.model, job.where);
  add_optimizer_state(st, job, false);
  ckpt::LoadOptions opts;
  opts.io_threads = 3;
  opts.max_read_bytes = 1000;
  ckpt::LoadResult r = ckpt::load(dir, st, job.world, opts);
  auto ref = reference(type);
  int bad = 0;
  for (const auto& [name, e] : st.entries) {
    const std::string param = e.attrs.count("param") ? e.attrs.at("param") : name;
    at::Tensor full = ref.at(param);
    if (e.attrs.count("key")) full = fake_state(full, e.attrs.at("key"));
    at::Tensor want = dist::extract_local(e.layout, rank, full);
    if (!at::equal(e.local.reshape({-1}), want.reshape({-1}))) {
      std::cerr << "rank " << rank << ": tensor '" << name << "' differs from the reference\n";
      ++bad;
    }
  }
  if (st.step <= 0 || st.data_position != st.step * 64) {
    std::cerr << "rank " << rank << ": step " << st.step << " / data position " << st.data_position
              << " not restored\n";
    ++bad;
  }
  // A resharded checkpoint has no RNG states to restore.
  if (r.rng_restored && st.rng.count("cpu") && st.rng.at("cpu") != "rank" + std::to_string(rank)) {
    std::cerr << "rank " << rank << ": wrong RNG state\n";
    ++bad;
  }
  std::cout << "rank " << rank << ": " << st.entries.size() << " tensors checked, " << bad
            << " differ; read " << r.bytes_read << " bytes\n";
  job.world->barrier().wait();
  return bad == 0 ? 0 : 1;
}

constexpr int64_t kTrainSteps = 12;
constexpr int64_t kGlobalBatch = 8;
constexpr int64_t kSeqLen = 16;

int train_mode(const std::string& root, const std::string& data, int tp, int dp, bool zero1,
               int64_t first, int64_t last, int64_t save_at) {
  auto world = dist::init_process_group();
  auto mesh = dist::DeviceMesh::create(world, {{"dp", dp}, {"tp", tp}});
  nn::Transformer model(tiny("llama"), {tp > 1 ? mesh.group("tp") : nullptr, nullptr});
  model.init_random(kSeed);
  const ckpt::ModelState where{static_cast<int>(mesh.coord("dp")), dp};
  const int rank = world->rank();
  nn::TrainerOptions opts;
  opts.steps = kTrainSteps;
  opts.lr = 1e-2;
  opts.min_lr = 1e-3;
  opts.warmup = 2;
  opts.max_grad_norm = 1.0;
  opts.zero1 = zero1;
  ckpt::SaveHandle copied, deferred;
  opts.before_update = [&] { deferred.release_tensors(); };
  nn::Trainer trainer(model, opts, dp > 1 ? mesh.group("dp") : nullptr);
  auto dataset = nn::TokenDataset::open(data);

  // One State, built once: its tensors alias the model and the optimizer,
  // so it serves every save and the load.
  ckpt::State state;
  ckpt::add_trainer(state, trainer, where);
  ckpt::Checkpointer ck;
  if (first > 0) {
    auto dir = fs::exists(ckpt::step_dir(root, first)) ? std::optional(ckpt::step_dir(root, first))
                                                       : ckpt::latest(root);
    if (!dir) {
      std::cerr << "rank " << rank << ": no checkpoint in " << root << "\n";
      return 1;
    }
    ckpt::LoadResult r = ck.load(*dir, state, world);
    ckpt::restore_trainer(state, trainer, where, r);
    if (trainer.steps() != first || state.data_position != first * kGlobalBatch) {
      std::cerr << "rank " << rank << ": resumed at step " << trainer.steps() << ", data position "
                << state.data_position << "; expected step " << first << "\n";
      return 1;
    }
  }
  // Samples consumed, over all dp ranks: what picks the next global batch,
  // whatever the layout (each dp rank takes its share of it).
  int64_t position = first > 0 ? state.data_position : 0;
  for (int64_t step = first; step < last; ++step) {
    if (save_at > 0 && (step == save_at - 1 || step == save_at)) {
      state.step = trainer.steps();
      state.data_position = position;
      ckpt::SaveOptions so;
      so.defer_copy = step == save_at;
      (so.defer_copy ? deferred : copied) =
          ck.save_async(ckpt::step_dir(root, step), state, world, so);
    }
    auto batch = dataset.batch(position / kGlobalBatch, kGlobalBatch, kSeqLen, where.dp_rank, dp);
    position += kGlobalBatch;
    nn::StepStats stats = trainer.step(batch.input_ids, batch.labels);
    if (rank == 0)
      std::printf("ckpt-loss %lld %.17g\n", static_cast<long long>(stats.step), stats.loss);
    if (copied.valid()) copied.wait();  // one step later: the snapshot was taken before it
    copied = ckpt::SaveHandle();
  }
  if (deferred.valid()) deferred.wait();
  std::fflush(stdout);
  world->barrier().wait();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string root, dir, type, data;
  int64_t step = 0, first = 0, last = 0, save_at = 0;
  int tp = 1, ep = 1, dp = 1, kill_rank = -1, zero1 = 0;
  CLI::App app{
      "One rank of a checkpoint job (tests/ckpt/ckpt_launch_test.cpp runs it under "
      "tessera-launch); see the modes' --help.",
      "ckpt_rank_program"};
  app.require_subcommand(1);
  CLI::App* save_cmd = app.add_subcommand(
      "save", "save a model and optimizer state of that layout at step_dir(ROOT, STEP)");
  save_cmd->add_option("ROOT", root, "checkpoint root")->required();
  save_cmd->add_option("STEP", step, "the step to save as")->required();
  save_cmd->add_option("TYPE", type, "the model")
      ->required()
      ->check(CLI::IsMember({"llama", "mixtral"}));
  save_cmd->add_option("TP", tp, "tensor-parallel degree")->required();
  save_cmd->add_option("EP", ep, "expert-parallel degree")->required();
  save_cmd->add_option("DP", dp, "data-parallel degree")->required();
  save_cmd
      ->add_option("KILL_RANK", kill_rank,
                   "this rank dies after writing its data file, before the commit; -1: none")
      ->capture_default_str();
  CLI::App* load_cmd = app.add_subcommand(
      "load", "load DIR into that layout and check every local tensor against the reference");
  load_cmd->add_option("DIR", dir, "the checkpoint step directory")->required();
  load_cmd->add_option("TYPE", type, "the model")
      ->required()
      ->check(CLI::IsMember({"llama", "mixtral"}));
  load_cmd->add_option("TP", tp, "tensor-parallel degree")->required();
  load_cmd->add_option("EP", ep, "expert-parallel degree")->required();
  load_cmd->add_option("DP", dp, "data-parallel degree")->required();
  CLI::App* train_cmd = app.add_subcommand(
      "train", "train a llama model over steps [FIRST, LAST), resuming from ROOT when FIRST > 0");
  train_cmd->add_option("ROOT", root, "checkpoint root")->required();
  train_cmd->add_option("DATA", data, "the token file")->required();
  train_cmd->add_option("TP", tp, "tensor-parallel degree")->required();
  train_cmd->add_option("DP", dp, "data-parallel degree")->required();
  train_cmd->add_option("ZERO1", zero1, "1: ZeRO-1 AdamW, 0: plain AdamW")->required();
  train_cmd->add_option("FIRST", first, "first step")->required();
  train_cmd->add_option("LAST", last, "step to stop before")->required();
  train_cmd->add_option("SAVE_AT", save_at, "> 0: save twice while training, around this step")
      ->required();
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;

  tessera::init_runtime();
  try {
    if (save_cmd->parsed()) return save_mode(root, step, type, tp, ep, dp, kill_rank);
    if (load_cmd->parsed()) return load_mode(dir, type, tp, ep, dp);
    return train_mode(root, data, tp, dp, zero1 != 0, first, last, save_at);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 3;
  }
}
