// Tessera quickstart — the README's main job.
//
//   build/release/bin/quickstart            # starts 2 local ranks itself
//   build/release/bin/tessera-launch --nproc 4 -- build/release/bin/quickstart
//
// It takes no options (--help says so); QUICKSTART_DIR sets where its files
// go.
//
// Stage 1 (distributed runtime): the ranks meet through the torchrun
// variables, arrange themselves on a 2-axis device mesh (dp x tp), move a
// 256 MiB tensor from a row-sharded to a column-sharded layout and back,
// check it bit for bit, and exchange uneven pieces with all_to_all, as MoE
// token dispatch does. It prints what it did and how fast.
//
// Stage 2 (models): pretrains a small Mixtral-style MoE on synthetic
// arithmetic text, its experts spread over the ranks (expert parallel), for
// about a minute; shows the loss falling and the load per expert; then
// generates answers to held-out questions and saves the model as a Hugging
// Face folder (QUICKSTART_DIR, default /tmp/tessera-quickstart). Halfway
// through it checkpoints model and optimizer (ckpt), and at the end loads
// that checkpoint in the same layout and into a different one (data
// parallel, every rank holding all experts) and shows training resume with
// the same losses (identical, and equal to float32 rounding).
//
// Stage 3 (adapters): every rank loads that folder, freezes it, and
// fine-tunes adapters data parallel on a task the model never saw
// (multiplication), once with LoRA and once with Mixture-of-Shards at a
// fraction of LoRA's trainable parameters, and prints both side by side.
//
// Stage 4 (QSPEC): rank 0 packs the pretrained MoE's linear layers to int4
// once and decodes held-out questions with W4A16 (weight-only) and with
// QSPEC (draft in W4A4, verify in W4A16, one KV cache), checks that the two
// agree token for token and prints speed and acceptance.
//
// Stage 5 (RLHF): once the ranks are done, this process becomes a
// single-controller driver: it starts 2 worker processes hosting the actor
// (trained tensor parallel, generating through the 3D-HybridEngine), the
// reference policy and a rule reward, and runs a few GRPO iterations on the
// pretrained MoE, printing the mean reward per iteration.
//
// Stage 6 (serving): the serving engine and its OpenAI-compatible HTTP
// server (what tessera-serve runs) start in this process on
// SmolLM2-135M-Instruct with int4 weights (W4A16), and 8 clients send
// streamed chat requests at once over loopback; it prints each request's
// time to first token and time per output token, and checks that every KV
// block is free afterwards. Without SmolLM2 (scripts/install-deps.sh
// installs it) the stage says so and is skipped.
#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <random>
#include <thread>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "command_line.h"
#include "smollm2.h"
#include "tessera/ckpt/checkpoint.h"
#include "tessera/ckpt_nn/model_state.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/dist/device_mesh.h"
#include "tessera/dist/launcher.h"
#include "tessera/dist/redistribute.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/lora/lora.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"
#include "tessera/rlhf/driver.h"
#include "tessera/rlhf/pipeline.h"
#include "tessera/serve/engine.h"
#include "tessera/serve/http_server.h"
#include "tessera/specdec/qspec.h"
#include "tessera/tasks/arithmetic.h"

namespace td = tessera::dist;
namespace tn = tessera::nn;

namespace {

// Re-runs this program as `nproc` ranks when started by hand.
int relaunch_self(int argc, char** argv, int nproc) {
  char self[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  TESSERA_CHECK(n > 0, Internal, "cannot find this program's path");
  self[n] = '\0';
  td::LaunchOptions launch;
  launch.nproc = nproc;
  launch.prefix_output = false;  // only rank 0 prints; log lines carry their rank
  launch.command.assign(argv, argv + argc);
  launch.command[0] = self;
  std::cout << "quickstart: starting " << nproc << " local ranks" << std::endl;
  return td::launch(launch, std::cerr);
}

// Stage 1: mesh, redistribute there and back, uneven all_to_all.
void stage_distributed(td::ProcessGroup& world,
                       const std::shared_ptr<td::ProcessGroup>& world_ptr) {
  const int me = world.rank(), n = world.size();
  const int64_t tp = n % 2 == 0 ? 2 : 1;
  auto mesh = td::DeviceMesh::create(world_ptr, {{"dp", n / tp}, {"tp", tp}});
  if (me == 0) {
    std::cout << "[1/6] distributed runtime: " << n << " ranks on a mesh dp=" << n / tp
              << " x tp=" << tp << " (" << td::backend_name(world.backend()) << ")\n";
  }

  // A 256 MiB fp32 tensor: rows sharded over tp (replicated over dp), to
  // columns sharded over every rank, and back.
  const int64_t rows = 8192, cols = 8192;
  auto rows_layout = td::Layout::sharded({rows, cols}, mesh.shape(),
                                         {td::Placement::Replicate(), td::Placement::Shard(0)});
  auto cols_layout = td::Layout::sharded({rows, cols}, mesh.shape(),
                                         {td::Placement::Shard(1), td::Placement::Shard(1)});
  auto local_shape = rows_layout.local_shape(me);
  // Each element encodes its global index, so any misplaced byte shows.
  const auto& box = rows_layout.chunks(me)[0].box;
  at::Tensor mine =
      at::arange(box.offset[0] * cols, (box.offset[0] + box.length[0]) * cols, at::kLong)
          .to(at::kFloat)
          .view(local_shape);
  auto plan_there = td::plan_redistribute(rows_layout, cols_layout);
  auto plan_back = td::plan_redistribute(cols_layout, rows_layout);
  world.barrier().wait();
  tessera::Stopwatch watch;
  at::Tensor there = td::redistribute(world, mine, rows_layout, cols_layout, plan_there);
  at::Tensor back = td::redistribute(world, there, cols_layout, rows_layout, plan_back);
  world.barrier().wait();
  double seconds = watch.seconds();
  at::Tensor ok = at::full({1}, at::equal(back, mine) ? 1 : 0, at::kInt);
  world.all_reduce(ok, td::ReduceOp::kMin).wait();
  int64_t moved = (plan_there.moved_elements() + plan_back.moved_elements()) * 4;
  if (me == 0) {
    std::printf(
        "      redistribute %lldx%lld fp32 rows->columns->rows: %.1f MiB crossed ranks in "
        "%.3f s (%.2f GB/s aggregate), round trip %s\n",
        static_cast<long long>(rows), static_cast<long long>(cols), moved / 1048576.0, seconds,
        moved / seconds / 1e9, ok.item<int>() ? "bit-exact" : "MISMATCH");
  }
  TESSERA_CHECK(ok.item<int>() == 1, DataLoss, "redistribute round trip changed the tensor");

  // Uneven all_to_all: rank s sends (s + 2d + 1) * 1000 rows of width 64 to
  // rank d, each row tagged with (sender, receiver).
  auto count = [](int s, int d) { return static_cast<int64_t>((s + 2 * d + 1) * 1000); };
  std::vector<int64_t> send_splits, recv_splits;
  std::vector<at::Tensor> pieces;
  for (int d = 0; d < n; ++d) {
    send_splits.push_back(count(me, d));
    pieces.push_back(at::full({count(me, d), 64}, me * 1000.0 + d));
  }
  int64_t incoming = 0;
  for (int s = 0; s < n; ++s) {
    recv_splits.push_back(count(s, me));
    incoming += count(s, me);
  }
  at::Tensor sent = at::cat(pieces);
  at::Tensor got = at::empty({incoming, 64});
  watch.reset();
  world.all_to_all(got, sent, recv_splits, send_splits).wait();
  double a2a_seconds = watch.seconds();
  bool a2a_ok = true;
  int64_t offset = 0;
  for (int s = 0; s < n; ++s) {
    a2a_ok &= at::equal(got.narrow(0, offset, count(s, me)),
                        at::full({count(s, me), 64}, s * 1000.0 + me));
    offset += count(s, me);
  }
  at::Tensor a2a_flag = at::full({1}, a2a_ok ? 1 : 0, at::kInt);
  world.all_reduce(a2a_flag, td::ReduceOp::kMin).wait();
  if (me == 0) {
    std::printf("      all_to_all with uneven splits (rank 0 sends");
    for (auto s : send_splits) std::printf(" %lld", static_cast<long long>(s));
    std::printf(" rows): %s in %.1f ms\n",
                a2a_flag.item<int>() ? "every piece in place" : "MISMATCH", a2a_seconds * 1e3);
  }
  TESSERA_CHECK(a2a_flag.item<int>() == 1, DataLoss, "all_to_all delivered wrong pieces");
}

std::string output_dir() {
  const char* dir = std::getenv("QUICKSTART_DIR");
  return dir && *dir ? dir : "/tmp/tessera-quickstart";
}

// Stage 2: pretrain a small MoE with expert parallelism, then generate.
void stage_pretrain(const std::shared_ptr<td::ProcessGroup>& world) {
  const int me = world->rank(), n = world->size();
  const std::string dir = output_dir();
  auto tokenizer = tn::Tokenizer::bytes({"<|endoftext|>"});

  // The corpus: 40,000 arithmetic questions with answers, as bytes.
  if (me == 0) {
    std::filesystem::create_directories(dir);
    tn::TokenDataset::write(dir + "/arithmetic.tokens",
                            tessera::tasks::arithmetic_corpus(tokenizer, 40000, /*seed=*/1));
  }
  world->barrier().wait();
  auto data = tn::TokenDataset::open(dir + "/arithmetic.tokens");

  tn::ModelConfig cfg =
      tessera::tasks::small_arithmetic_config(tokenizer.vocab_size(), /*num_experts=*/4);
  // Experts spread over every rank; each rank trains on its own tokens.
  tn::ParallelGroups groups{nullptr, n > 1 && cfg.num_experts % n == 0 ? world : nullptr};
  tn::Transformer model(cfg, groups);
  model.init_random(/*seed=*/7);

  tn::TrainerOptions opts;
  opts.steps = 320;
  opts.lr = 3e-3;
  opts.min_lr = 3e-4;
  opts.warmup = 20;
  tn::Trainer trainer(model, opts, groups.ep ? nullptr : world);
  const int64_t global_batch = 16 * n, seq_len = 64;
  if (me == 0) {
    std::cout << "[2/6] pretrain " << cfg.summary() << "\n      on " << data.num_tokens()
              << " tokens of arithmetic text, " << (groups.ep ? "experts" : "data")
              << " parallel over " << n << " ranks, " << opts.steps << " steps of "
              << global_batch * seq_len << " tokens\n";
  }
  tessera::Stopwatch watch;
  double first_loss = 0, last_loss = 0;
  const int64_t save_step = opts.steps / 2, compare_steps = 8;
  std::vector<double> reference_losses;
  tessera::ckpt::Checkpointer checkpointer;
  const std::string ckpt_dir = tessera::ckpt::step_dir(dir + "/checkpoints", save_step);
  for (int64_t step = 0; step < opts.steps; ++step) {
    if (step == save_step) {
      // Model, AdamW state and step of the expert-parallel layout (one
      // replica spanning all ranks: dp = 1).
      tessera::ckpt::State state;
      tessera::ckpt::add_trainer(state, trainer, {0, 1});
      tessera::ckpt::SaveOptions save_opts;
      save_opts.overwrite = true;
      checkpointer.save(ckpt_dir, state, world, save_opts);
    }
    auto batch = data.batch(step, global_batch, seq_len, me, n, /*seed=*/3);
    auto stats = trainer.step(batch.input_ids, batch.labels);
    if (step >= save_step && step < save_step + compare_steps)
      reference_losses.push_back(stats.loss);
    if (step == 0) first_loss = stats.loss;
    last_loss = stats.loss;
    if (me == 0 && (step % 40 == 0 || step + 1 == opts.steps)) {
      at::Tensor load = stats.expert_load.sum(0);
      load = load / load.sum() * 100;
      std::printf(
          "      step %3lld/%lld  loss %.3f  aux %.4f  lr %.1e  %6.0f tok/s  expert load %%:",
          static_cast<long long>(step + 1), static_cast<long long>(opts.steps), stats.loss,
          stats.aux_loss, stats.lr, stats.tokens_per_second);
      for (int64_t e = 0; e < load.size(0); ++e) std::printf(" %.0f", load[e].item<double>());
      std::printf("  (%.0f s)\n", watch.seconds());
      std::fflush(stdout);
    }
  }

  // Generate answers to questions the corpus never held (another seed).
  auto questions = tessera::tasks::arithmetic_examples(32, /*seed=*/99);
  std::vector<std::vector<int64_t>> prompts;
  for (const auto& q : questions) {
    auto ids = tokenizer.encode(q.prompt);
    prompts.emplace_back(ids.begin(), ids.end());
  }
  tn::SamplingOptions sampling;
  sampling.max_new_tokens = 5;
  sampling.stop_tokens = {tokenizer.encode("\n")[0]};
  auto result = tn::generate(model, prompts, sampling);
  int correct = 0, last_digit = 0, length = 0;
  std::string shown;
  for (size_t i = 0; i < questions.size(); ++i) {
    std::vector<int32_t> out(result.tokens[i].begin(), result.tokens[i].end());
    std::string answer = tokenizer.decode(out, true);
    while (!answer.empty() && answer.back() == '\n') answer.pop_back();
    const auto score = tessera::tasks::score_arithmetic(questions[i], answer);
    correct += score.exact;
    last_digit += score.last_digit;
    length += score.length;
    if (i < 3) shown += (shown.empty() ? "" : " | ") + questions[i].prompt + answer;
  }
  auto weights = tn::gather_full_weights(model, groups.ep);
  if (me == 0) {
    std::printf("      loss %.3f -> %.3f in %.0f s; generated: %s\n", first_loss, last_loss,
                watch.seconds(), shown.c_str());
    // What a minute of training teaches: the answer's form and its units
    // digit (which needs no carry) well before whole sums.
    std::printf(
        "      %zu held-out questions: units digit right %d (chance ~%zu), number of digits right "
        "%d, "
        "whole answer right %d\n",
        questions.size(), last_digit, questions.size() / 10, length, correct);
    tn::save_hf_model(dir + "/pretrained", cfg, weights);
    std::cout << "      saved " << dir << "/pretrained (config.json + model.safetensors)\n";
  }
  TESSERA_CHECK(last_loss < first_loss * 0.6, Internal, "pretraining did not reduce the loss (",
                first_loss, " -> ", last_loss, ")");

  // Resume from the checkpoint in the saved layout: the same computation as
  // the uninterrupted run from that step, so every loss must be identical.
  {
    tn::Transformer same(cfg, groups);
    tn::Trainer same_trainer(same, opts, groups.ep ? nullptr : world);
    tessera::ckpt::State want;
    tessera::ckpt::add_trainer(want, same_trainer, {0, 1});
    auto loaded = checkpointer.load(ckpt_dir, want, world);
    tessera::ckpt::restore_trainer(want, same_trainer, {0, 1}, loaded);
    int identical = 0;
    for (int64_t k = 0; k < compare_steps; ++k) {
      auto batch = data.batch(save_step + k, global_batch, seq_len, me, n, /*seed=*/3);
      identical += same_trainer.step(batch.input_ids, batch.labels).loss == reference_losses[k];
    }
    if (me == 0) {
      std::printf(
          "      checkpoint of step %lld resumed in the same layout: %d of %lld losses "
          "identical to the uninterrupted run\n",
          static_cast<long long>(save_step), identical, static_cast<long long>(compare_steps));
    }
    TESSERA_CHECK(identical == compare_steps, Internal, "resuming in the saved layout changed ",
                  compare_steps - identical, " of ", compare_steps, " losses");
  }

  // Resume from the checkpoint in another layout: data parallel, each rank
  // a whole model (all experts), the same global batches.
  tn::Transformer resumed(cfg);
  tn::Trainer resumed_trainer(resumed, opts, world);
  tessera::ckpt::State want;
  tessera::ckpt::add_trainer(want, resumed_trainer, {me, n});
  auto loaded = checkpointer.load(ckpt_dir, want, world);
  tessera::ckpt::restore_trainer(want, resumed_trainer, {me, n}, loaded);
  double first_diff = 0, worst = 0;
  std::string pairs;
  for (int64_t k = 0; k < compare_steps; ++k) {
    auto batch = data.batch(save_step + k, global_batch, seq_len, me, n, /*seed=*/3);
    double loss = resumed_trainer.step(batch.input_ids, batch.labels).loss;
    double diff = std::abs(loss - reference_losses[k]) / reference_losses[k];
    if (k == 0) first_diff = diff;
    worst = std::max(worst, diff);
    if (k < 3) {
      char buf[64];
      std::snprintf(buf, sizeof(buf), "%s%.5f/%.5f", k ? " " : "", reference_losses[k], loss);
      pairs += buf;
    }
  }
  if (me == 0) {
    std::printf(
        "      checkpoint of step %lld (experts over %d ranks) resumed data parallel: losses "
        "(original/resumed) %s ...; relative difference %.1e at the first step, at most %.1e "
        "over %lld steps\n",
        static_cast<long long>(save_step), n, pairs.c_str(), first_diff, worst,
        static_cast<long long>(compare_steps));
  }
  // The two layouts compute the same sums in different orders (experts
  // behind an all_to_all, gradients averaged over other groups), so the
  // losses agree to float32 rounding.
  TESSERA_CHECK(worst < 1e-5, Internal,
                "training resumed data parallel differs from the "
                "uninterrupted run by ",
                worst, " (relative) within ", compare_steps, " steps");
}

// Stage 3: LoRA vs MoS fine-tuning of the pretrained model, data parallel.
void stage_adapters(const std::shared_ptr<td::ProcessGroup>& world) {
  const int me = world->rank(), n = world->size();
  auto tokenizer = tn::Tokenizer::bytes({"<|endoftext|>"});
  // Multiplication questions, "Q: 7*8=? A: 56\n", as byte windows.
  auto batch_of = [&](int64_t step, int64_t count) {
    std::mt19937_64 rng(static_cast<uint64_t>(step) * 7919 + 17);
    at::Tensor ids = at::zeros({count, 24}, at::kLong),
               labels = at::full({count, 24}, -100, at::kLong);
    for (int64_t i = 0; i < count; ++i) {
      int a = static_cast<int>(rng() % 10), b = static_cast<int>(rng() % 10);
      std::string q = "Q: " + std::to_string(a) + "*" + std::to_string(b) + "=? A: ";
      std::string text = q + std::to_string(a * b) + "\n";
      auto t = tokenizer.encode(text);
      for (size_t j = 0; j < t.size() && j < 24; ++j) ids[i][static_cast<int64_t>(j)] = t[j];
      // Loss on the answer and the newline only.
      for (size_t j = q.size() - 1; j + 1 < t.size() && j < 23; ++j)
        labels[i][static_cast<int64_t>(j)] = t[j + 1];
    }
    return std::make_pair(ids, labels);
  };
  const std::vector<std::string> targets{"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"};
  auto run = [&](const char* name, const std::shared_ptr<tessera::lora::Adapter>& adapter,
                 tn::Transformer& model) {
    model.set_adapter(adapter);
    tn::TrainerOptions opts;
    opts.steps = 80;
    opts.lr = 1e-2;
    opts.min_lr = 1e-3;
    opts.warmup = 5;
    opts.adamw.weight_decay = 0;
    tn::Trainer trainer(model, opts, world, adapter->trainable());
    double first = 0, last = 0;
    for (int64_t step = 0; step < opts.steps; ++step) {
      auto [ids, labels] = batch_of(step, 16 * n);
      auto stats = trainer.step(ids.narrow(0, me * 16, 16), labels.narrow(0, me * 16, 16));
      if (step == 0) first = stats.loss;
      last = stats.loss;
    }
    model.set_adapter(nullptr);
    if (me == 0) {
      std::printf("      %-5s %7lld trainable (LoRA-equivalent rank %5.2f): loss %.3f -> %.3f\n",
                  name, static_cast<long long>(adapter->report().trainable),
                  adapter->report().equivalent_rank, first, last);
      std::fflush(stdout);
    }
  };
  tn::Transformer base = tn::load_hf_model(output_dir() + "/pretrained");
  if (me == 0) {
    std::cout
        << "[3/6] adapters: the pretrained model frozen, multiplication (never seen) learnt by "
           "adapters, data parallel over "
        << n << " ranks\n";
  }
  run("LoRA", tessera::lora::make_lora(base, {16, 32, 0.0, false, targets}, 1), base);
  tessera::lora::MosConfig mos;
  mos.rank = 16;
  mos.alpha = 32;
  mos.target_modules = targets;
  mos.public_fraction = 0.125;
  run("MoS", tessera::lora::make_mos(base, mos), base);
}

// Stage 4: QSPEC over the pretrained model's packed weights (rank 0).
void stage_qspec(const std::shared_ptr<td::ProcessGroup>& world) {
  if (world->rank() != 0) return;
  namespace tq = tessera::quant;
  namespace ts = tessera::specdec;
  auto tokenizer = tn::Tokenizer::bytes({"<|endoftext|>"});
  tn::Transformer model = tn::load_hf_model(output_dir() + "/pretrained");
  auto packed = tq::QuantizedModel::pack(model, {64, true});
  model.set_linear_override(packed);
  std::cout << "[4/6] QSPEC: " << packed->weights().size() << " linear layers packed to int4 ("
            << packed->bytes() / 1024 << " KiB; fp32 " << model.num_local_parameters() * 4 / 1024
            << " KiB), kernels " << tq::isa_name(tq::best_isa()) << "\n";
  std::vector<std::vector<int64_t>> prompts;
  for (const auto& q : tessera::tasks::arithmetic_examples(32, /*seed=*/99)) {
    auto ids = tokenizer.encode(q.prompt);
    prompts.emplace_back(ids.begin(), ids.end());
  }
  ts::GenerateOptions opts;
  opts.sampling.max_new_tokens = 24;  // no stop token: it writes further lines
  opts.qspec.gamma = 3;
  auto run = [&](const char* decoding, tq::Mode draft) {
    ts::parse_decoding(decoding, &opts);
    opts.qspec.draft_mode = draft;
    tessera::Stopwatch watch;
    auto r = ts::generate(model, *packed, prompts, opts);
    return std::make_pair(r, r.new_tokens / watch.seconds());
  };
  auto [w4a16, w4a16_tps] = run("w4a16", tq::Mode::kW4A4);
  for (tq::Mode draft : {tq::Mode::kW4A4, tq::Mode::kW4A8}) {
    auto [spec, spec_tps] = run("qspec", draft);
    TESSERA_CHECK(spec.tokens == w4a16.tokens, Internal, "QSPEC output differs from W4A16's");
    std::printf(
        "      QSPEC (%s draft, gamma 3): %.0f tokens/s vs W4A16 %.0f; acceptance %.2f, "
        "%.2f tokens per verify; same tokens as W4A16 for all %zu prompts\n",
        tq::mode_name(draft), spec_tps, w4a16_tps, spec.stats.acceptance_rate(),
        spec.stats.tokens_per_verify(), prompts.size());
  }
  std::vector<int32_t> out(w4a16.tokens[0].begin(), w4a16.tokens[0].end());
  std::string text = tokenizer.decode(out, true);
  for (auto& ch : text)
    if (ch == '\n') ch = '|';
  std::printf("      e.g. %s%s\n", tessera::tasks::arithmetic_examples(1, 99)[0].prompt.c_str(),
              text.c_str());
  std::cout << "      (on this CPU a draft forward costs about what a verify forward does, so "
               "QSPEC does not beat W4A16 here; docs/qspec.md says why)\n";
}

// Stage 5: GRPO on the pretrained MoE, driver here, 2 worker processes.
int stage_grpo() {
  namespace tr = tessera::rlhf;
  const std::string model = "{\"hf\": \"" + output_dir() + "/pretrained\"}";
  tr::DriverOptions d;
  d.pools = {{"all", 2}};
  d.roles = {
      {"actor", "actor", "all",
       "{\"model\": " + model + ", \"tp\": 2, \"gen_tp\": 1, \"lr\": 1e-4, \"max_new_tokens\": 6}"},
      {"reference", "reference", "all", "{\"model\": " + model + "}"},
      {"reward", "reward_rule", "all", "{\"tokenizer\": \"bytes\"}"}};
  std::cout << "[5/6] RLHF: GRPO on the pretrained MoE (1 driver + 2 worker processes; actor "
               "trains tp 2,\n"
               "      generates tp 1 via the 3D-HybridEngine; reference and rule reward colocated)"
            << std::endl;
  tr::Driver driver(d);
  tr::PipelineOptions o;
  o.iterations = 12;
  o.prompts_per_iteration = 16;
  o.samples = 8;
  o.data_seed = 1234;
  o.max_operand = 9;  // single-digit questions: the 2-digit ones are mostly beyond this small model
  std::vector<double> rewards;
  tr::run_grpo(
      driver, tn::Tokenizer::bytes({"<|endoftext|>"}), o, [&](const tr::IterationStats& s) {
        rewards.push_back(s.mean_score);
        std::printf(
            "      iteration %2lld  mean reward %.3f  kl %.4f  %.2f s  reshard %.2f MB/rank\n",
            static_cast<long long>(s.iteration), s.mean_score, s.kl, s.seconds,
            s.transition_bytes / 1e6);
      });
  const double first = (rewards[0] + rewards[1] + rewards[2]) / 3;
  const double last =
      (rewards[rewards.size() - 1] + rewards[rewards.size() - 2] + rewards[rewards.size() - 3]) / 3;
  std::printf(
      "      mean reward, first 3 iterations %.3f -> last 3 %.3f (examples/rlhf_grpo runs "
      "longer)\n",
      first, last);
  driver.shutdown();
  return 0;
}

// One streamed chat request over HTTP, timed from sending it.
struct StreamTiming {
  double ttft = 0;  // seconds to the first piece of the answer
  double e2e = 0;   // seconds to the end of the stream
  int64_t completion_tokens = 0;
  std::string text;
};

StreamTiming streamed_chat(int port, const std::string& question) {
  httplib::Client client("127.0.0.1", port);
  client.set_read_timeout(300, 0);
  nlohmann::json body = {{"messages", {{{"role", "user"}, {"content", question}}}},
                         {"max_tokens", 32},
                         {"temperature", 0},
                         {"stream", true},
                         {"stream_options", {{"include_usage", true}}}};
  StreamTiming t;
  std::string pending;
  tessera::Stopwatch watch;
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/chat/completions";
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  // Server-sent events: "data: {chunk}" lines, then "data: [DONE]".
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    pending.append(data, n);
    for (size_t nl; (nl = pending.find('\n')) != std::string::npos;) {
      const std::string line = pending.substr(0, nl);
      pending.erase(0, nl + 1);
      if (line.rfind("data: {", 0) != 0) continue;
      const auto chunk = nlohmann::json::parse(line.substr(6));
      if (chunk.contains("usage") && chunk["usage"].is_object()) {
        t.completion_tokens = chunk["usage"]["completion_tokens"].get<int64_t>();
      }
      if (chunk["choices"].empty()) continue;
      const auto& delta = chunk["choices"][0]["delta"];
      if (delta.contains("content") && !delta["content"].get<std::string>().empty()) {
        if (t.text.empty()) t.ttft = watch.seconds();
        t.text += delta["content"].get<std::string>();
      }
    }
    return true;
  };
  httplib::Response res;
  httplib::Error error = httplib::Error::Success;
  TESSERA_CHECK(client.send(req, res, error) && res.status == 200, Unavailable,
                "quickstart: streamed request to 127.0.0.1:", port, " failed: ",
                error != httplib::Error::Success ? httplib::to_string(error) : res.body);
  t.e2e = watch.seconds();
  return t;
}

// Stage 6: the engine and the HTTP server, 8 concurrent streamed requests.
void stage_serve() {
  namespace tsv = tessera::serve;
  const std::string gguf = tessera::examples::smollm2_gguf_path();
  if (gguf.empty()) {
    std::cout << "[6/6] serving: skipped, SmolLM2-135M-Instruct is not installed "
                 "(scripts/install-deps.sh installs it)"
              << std::endl;
    return;
  }
  tsv::EngineOptions eo;
  eo.model = gguf;
  eo.quantization = "w4a16";
  eo.max_num_seqs = 8;
  eo.kv_memory_bytes = int64_t{64} << 20;
  auto engine = tsv::Engine::create(eo);
  tsv::HttpServerOptions ho;
  ho.port = 0;  // a free one
  auto server = tsv::HttpServer::start(*engine, ho);
  std::cout << "[6/6] serving: " << engine->model_name()
            << " (int4 weights, W4A16) behind the OpenAI API on " << server->url()
            << ",\n      8 clients streaming chat answers at once" << std::endl;
  const std::vector<std::string> questions = {"What is the capital of France?",
                                              "Name three primary colors.",
                                              "What is 7 times 8?",
                                              "Who wrote Romeo and Juliet?",
                                              "What is the boiling point of water in Celsius?",
                                              "Name a planet in our solar system.",
                                              "What language is spoken in Brazil?",
                                              "How many days are there in a week?"};
  std::vector<StreamTiming> timings(questions.size());
  tessera::Stopwatch wall;
  {
    std::vector<std::thread> clients;
    std::vector<std::exception_ptr> errors(questions.size());
    for (size_t i = 0; i < questions.size(); ++i) {
      clients.emplace_back([&, i] {
        try {
          timings[i] = streamed_chat(server->port(), questions[i]);
        } catch (...) {
          errors[i] = std::current_exception();
        }
      });
    }
    for (auto& c : clients) c.join();
    for (auto& e : errors) {
      if (e) std::rethrow_exception(e);
    }
  }
  const double seconds = wall.seconds();
  int64_t tokens = 0;
  std::vector<double> ttft, tpot;
  for (const auto& t : timings) {
    tokens += t.completion_tokens;
    ttft.push_back(t.ttft);
    if (t.completion_tokens > 1)
      tpot.push_back((t.e2e - t.ttft) / static_cast<double>(t.completion_tokens - 1));
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
  };
  std::printf(
      "      time to first token: median %.0f ms (max %.0f ms); time per output token: median %.1f "
      "ms\n",
      median(ttft) * 1e3, *std::max_element(ttft.begin(), ttft.end()) * 1e3, median(tpot) * 1e3);
  std::printf("      %lld tokens in %.1f s (%.0f tokens/s over all streams)\n",
              static_cast<long long>(tokens), seconds, static_cast<double>(tokens) / seconds);
  std::string answer = timings[0].text;
  for (auto& ch : answer)
    if (ch == '\n') ch = ' ';
  std::cout << "      \"" << questions[0] << "\" -> \"" << answer << "\"" << std::endl;
  server->drain(std::chrono::seconds(10));
  const tsv::EngineStats st = engine->stats();
  TESSERA_CHECK(st.free_blocks == st.num_blocks, Internal,
                "quickstart: ", st.num_blocks - st.free_blocks,
                " KV blocks still held after every request finished");
  std::cout << "      every KV block free again (" << st.num_blocks << " blocks of "
            << eo.block_size << " tokens)" << std::endl;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    // Worker processes started by stage 5's driver run their roles here.
    if (std::getenv("TESSERA_RLHF_DRIVER")) {
      tessera::init_runtime();
      if (auto code = tessera::rlhf::run_worker_if_spawned(tessera::rlhf::RoleRegistry::builtin()))
        return *code;
    }
    // No options; the ranks it starts get the same (empty) command line.
    CLI::App app{
        "Tessera's tour in six stages: distributed runtime, MoE pretraining with "
        "checkpoints, LoRA and MoS adapters, QSPEC decoding, GRPO, serving.",
        "quickstart"};
    app.footer(
        "Run by hand it starts 2 local ranks itself; or run it under tessera-launch.\n"
        "Environment: QUICKSTART_DIR, where the corpus and the pretrained model go "
        "(default /tmp/tessera-quickstart).");
    if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
    if (!td::EnvInfo::from_env().distributed) {
      const int code = relaunch_self(argc, argv, 2);
      if (code != 0) return code;
      tessera::init_runtime();
      if (const int grpo = stage_grpo(); grpo != 0) return grpo;
      stage_serve();
      std::cout << "quickstart: done" << std::endl;
      return 0;
    }
    auto info = tessera::init_runtime();
    auto world = td::init_process_group();
    if (world->rank() == 0) std::cout << "runtime: " << info.summary() << "\n";
    stage_distributed(*world, world);
    stage_pretrain(world);
    stage_adapters(world);
    stage_qspec(world);
    world->barrier().wait();
    if (world->rank() == 0) std::cout << "quickstart: stages 1-4 done" << std::endl;
    return 0;
  } catch (const tessera::Error& e) {
    std::cerr << "quickstart failed: " << e.what() << std::endl;
    return 1;
  }
}
