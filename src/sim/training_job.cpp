#include "tessera/sim/training_job.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <tuple>

#include "json_reader.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/dist/device_mesh.h"
#include "util.h"

namespace tessera::sim {

// ---------------------------------------------------------------------------
// ParallelLayout

std::string ParallelLayout::to_string() const {
  std::string out;
  auto add = [&](const char* axis, int size) {
    if (size == 1) return;
    out += (out.empty() ? "" : ",") + std::string(axis) + "=" + std::to_string(size);
  };
  add("dp", dp);
  add("ep", ep);
  add("tp", tp);
  return out.empty() ? "dp=1" : out;
}

ParallelLayout ParallelLayout::parse(std::string_view text) {
  ParallelLayout layout;
  bool seen[3] = {false, false, false};  // dp, tp, ep
  const std::string all(text);
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(all);
  while (std::getline(in, part, ',')) {
    part.erase(std::remove(part.begin(), part.end(), ' '), part.end());
    TESSERA_CHECK(!part.empty(), InvalidArgument, "layout '", all,
                  "': empty part (expected e.g. 'dp=2,tp=2')");
    parts.push_back(part);
  }
  TESSERA_CHECK(!parts.empty(), InvalidArgument, "layout '", all,
                "': no axis given (expected e.g. 'dp=2,tp=2')");
  for (const std::string& p : parts) {
    const size_t eq = p.find('=');
    TESSERA_CHECK(eq != std::string::npos, InvalidArgument, "layout '", all, "': '", p,
                  "' is not AXIS=SIZE (axes dp, tp, ep)");
    const std::string axis = p.substr(0, eq);
    const std::string value = p.substr(eq + 1);
    const int index = axis == "dp" ? 0 : axis == "tp" ? 1 : axis == "ep" ? 2 : -1;
    TESSERA_CHECK(index >= 0, InvalidArgument, "layout '", all, "': unknown axis '", axis,
                  "' (axes: dp, tp, ep)");
    TESSERA_CHECK(!seen[index], InvalidArgument, "layout '", all, "': axis '", axis,
                  "' given twice");
    seen[index] = true;
    char* end = nullptr;
    const long size = value.empty() ? 0 : std::strtol(value.c_str(), &end, 10);
    TESSERA_CHECK(!value.empty() && end != nullptr && *end == '\0', InvalidArgument, "layout '",
                  all, "': size '", value, "' of axis '", axis, "' is not an integer");
    TESSERA_CHECK(size >= 1 && size <= (1 << 20), InvalidArgument, "layout '", all, "': axis '",
                  axis, "' has size ", size, " (must be >= 1)");
    (index == 0 ? layout.dp : index == 1 ? layout.tp : layout.ep) = static_cast<int>(size);
  }
  return layout;
}

RankCoords coords_of(const ParallelLayout& layout, int rank) {
  TESSERA_CHECK(rank >= 0 && rank < layout.world_size(), InvalidArgument, "rank ", rank,
                " outside layout ", layout.to_string(), " of ", layout.world_size(), " ranks");
  RankCoords c;
  c.tp = rank % layout.tp;
  c.ep = (rank / layout.tp) % layout.ep;
  c.dp = rank / (layout.tp * layout.ep);
  return c;
}

int rank_of(const ParallelLayout& layout, const RankCoords& c) {
  return (c.dp * layout.ep + c.ep) * layout.tp + c.tp;
}

// ---------------------------------------------------------------------------
// TrainingJobConfig

namespace {

std::string resolve(const std::string& base_dir, const std::string& path) {
  if (path.empty() || std::filesystem::path(path).is_absolute()) return path;
  return (std::filesystem::path(base_dir) / path).lexically_normal().string();
}

}  // namespace

TrainingJobConfig TrainingJobConfig::parse(std::string_view text, const std::string& source,
                                           const std::string& base_dir) {
  ConfigObject root = ConfigObject::parse(text, source);
  TrainingJobConfig c;
  c.source = source;
  c.name = root.get_string("name", "");
  TESSERA_CHECK(root.has("model"), InvalidArgument, source,
                ": missing key 'model' (a config.json object or a path to one)");
  const std::string raw_model = root.get_raw("model");
  if (!raw_model.empty() && raw_model.front() == '"') {
    const std::string path = resolve(base_dir, root.get_string("model"));
    c.model = nn::ModelConfig::load(path);
  } else {
    c.model = nn::ModelConfig::from_config(root.get_object("model"));
  }
  {
    ConfigObject layout = root.get_object("layout");
    c.layout.dp = static_cast<int>(layout.get_int("dp", 1));
    c.layout.tp = static_cast<int>(layout.get_int("tp", 1));
    c.layout.ep = static_cast<int>(layout.get_int("ep", 1));
    for (auto [axis, size] : {std::pair<const char*, int>{"dp", c.layout.dp},
                              {"tp", c.layout.tp},
                              {"ep", c.layout.ep}}) {
      TESSERA_CHECK(size >= 1, InvalidArgument, layout.where(), ".", axis, ": must be >= 1, got ",
                    size);
    }
  }
  c.zero1 = root.get_bool("zero1", false);
  if (root.has("batch")) {
    ConfigObject batch = root.get_object("batch");
    c.global_batch = batch.get_int("global_batch", c.global_batch);
    c.seq_len = batch.get_int("seq_len", c.seq_len);
    c.grad_accumulation = batch.get_int("grad_accumulation", c.grad_accumulation);
  }
  if (root.has("optimizer")) {
    ConfigObject opt = root.get_object("optimizer");
    c.lr = opt.get_double("lr", c.lr);
    c.min_lr = opt.get_double("min_lr", c.min_lr);
    c.warmup = opt.get_int("warmup", c.warmup);
    c.max_grad_norm = opt.get_double("max_grad_norm", c.max_grad_norm);
    c.adamw.weight_decay = opt.get_double("weight_decay", c.adamw.weight_decay);
    c.adamw.beta1 = opt.get_double("beta1", c.adamw.beta1);
    c.adamw.beta2 = opt.get_double("beta2", c.adamw.beta2);
    c.adamw.eps = opt.get_double("eps", c.adamw.eps);
  }
  const std::string precision = root.get_string("precision", "fp32");
  TESSERA_CHECK(precision == "fp32" || precision == "bf16_autocast", InvalidArgument, source,
                ": precision: expected \"fp32\" or \"bf16_autocast\", got \"", precision, "\"");
  c.bf16_autocast = precision == "bf16_autocast";
  c.steps = root.get_int("steps", c.steps);
  if (root.has("data")) {
    ConfigObject data = root.get_object("data");
    const std::string kind = data.get_string("kind", "synthetic");
    if (kind == "synthetic") {
      c.data_seed = static_cast<uint64_t>(data.get_int("seed", 1));
    } else if (kind == "tokens") {
      c.token_file = resolve(base_dir, data.get_string("path"));
      c.bytes_per_token = static_cast<int>(data.get_int("bytes_per_token", 2));
      c.data_seed = static_cast<uint64_t>(data.get_int("seed", 1));
    } else {
      TESSERA_THROW(InvalidArgument, data.where(),
                    ".kind: expected \"synthetic\" or \"tokens\", got \"", kind, "\"");
    }
  }
  c.seed = static_cast<uint64_t>(root.get_int("seed", 0));
  root.check_no_unknown_keys();
  c.validate();
  return c;
}

TrainingJobConfig TrainingJobConfig::load_file(const std::string& path) {
  std::string text = detail::read_text_file(path, "training job");
  std::string dir = std::filesystem::path(path).parent_path().string();
  return parse(text, path, dir.empty() ? "." : dir);
}

std::string TrainingJobConfig::to_json() const {
  nlohmann::ordered_json j;
  if (!name.empty()) j["name"] = name;
  j["model"] = nlohmann::ordered_json::parse(model.to_json());
  j["layout"] = {{"dp", layout.dp}, {"tp", layout.tp}, {"ep", layout.ep}};
  j["zero1"] = zero1;
  j["batch"] = {{"global_batch", global_batch},
                {"seq_len", seq_len},
                {"grad_accumulation", grad_accumulation}};
  j["optimizer"] = {{"lr", lr},
                    {"min_lr", min_lr},
                    {"warmup", warmup},
                    {"max_grad_norm", max_grad_norm},
                    {"weight_decay", adamw.weight_decay},
                    {"beta1", adamw.beta1},
                    {"beta2", adamw.beta2},
                    {"eps", adamw.eps}};
  j["precision"] = bf16_autocast ? "bf16_autocast" : "fp32";
  j["steps"] = steps;
  if (token_file.empty()) {
    j["data"] = {{"kind", "synthetic"}, {"seed", data_seed}};
  } else {
    j["data"] = {{"kind", "tokens"},
                 {"path", token_file},
                 {"bytes_per_token", bytes_per_token},
                 {"seed", data_seed}};
  }
  j["seed"] = seed;
  return j.dump(2) + "\n";
}

void TrainingJobConfig::validate() const {
  const ParallelLayout& l = layout;
  const std::string where = source + ": layout " + l.to_string();
  TESSERA_CHECK(l.dp >= 1 && l.tp >= 1 && l.ep >= 1, InvalidArgument, where,
                ": every axis must be >= 1");
  TESSERA_CHECK(model.num_attention_heads % l.tp == 0 && model.num_key_value_heads % l.tp == 0,
                InvalidArgument, where, ": tp=", l.tp, " must divide the ",
                model.num_attention_heads, " attention and ", model.num_key_value_heads,
                " key/value heads");
  if (l.ep > 1) {
    TESSERA_CHECK(model.num_experts > 0, InvalidArgument, where,
                  ": ep > 1 needs a MoE model (num_experts > 0)");
    TESSERA_CHECK(model.num_experts % l.ep == 0, InvalidArgument, where, ": ep=", l.ep,
                  " must divide num_experts=", model.num_experts);
    TESSERA_CHECK(l.dp == 1, InvalidArgument, where,
                  ": the trainer does not combine expert parallelism with a separate dp group "
                  "(use dp=1 with ep > 1)");
  }
  TESSERA_CHECK(!zero1 || l.dp > 1, InvalidArgument, where, ": zero1 needs dp > 1");
  TESSERA_CHECK(global_batch >= 1 && seq_len >= 1 && grad_accumulation >= 1, InvalidArgument,
                source,
                ": batch.global_batch, batch.seq_len and batch.grad_accumulation must be >= 1");
  TESSERA_CHECK(global_batch % (int64_t{data_ranks()} * grad_accumulation) == 0, InvalidArgument,
                source, ": batch.global_batch=", global_batch, " must be a multiple of dp * ep (",
                data_ranks(), ") times grad_accumulation (", grad_accumulation, ")");
  TESSERA_CHECK(seq_len <= model.max_position_embeddings, InvalidArgument, source,
                ": batch.seq_len=", seq_len,
                " exceeds the model's max_position_embeddings=", model.max_position_embeddings);
  TESSERA_CHECK(steps >= 1, InvalidArgument, source, ": steps must be >= 1, got ", steps);
  TESSERA_CHECK(bytes_per_token == 2 || bytes_per_token == 4, InvalidArgument, source,
                ": data.bytes_per_token must be 2 or 4");
}

TrainingJobConfig TrainingJobConfig::with_layout(const ParallelLayout& new_layout) const {
  TrainingJobConfig c = *this;
  c.layout = new_layout;
  return c;
}

// ---------------------------------------------------------------------------
// TrainingJob

struct TrainingJob::Impl {
  TrainingJobConfig config;
  std::shared_ptr<dist::ProcessGroup> world;
  std::shared_ptr<dist::ProcessGroup> dp, tp, ep;
  RankCoords coords;
  std::unique_ptr<nn::Transformer> model;
  std::unique_ptr<nn::Trainer> trainer;
  std::unique_ptr<nn::TokenDataset> tokens;
};

TrainingJob::TrainingJob() : impl_(std::make_unique<Impl>()) {}
TrainingJob::~TrainingJob() = default;

std::unique_ptr<TrainingJob> TrainingJob::create(const TrainingJobConfig& config,
                                                 std::shared_ptr<dist::ProcessGroup> world) {
  config.validate();
  TESSERA_CHECK(world != nullptr, InvalidArgument, config.source, ": no process group");
  TESSERA_CHECK(world->size() == config.layout.world_size(), InvalidArgument, config.source,
                ": layout ", config.layout.to_string(), " needs ", config.layout.world_size(),
                " ranks, the process group has ", world->size());
  std::unique_ptr<TrainingJob> job(new TrainingJob());
  Impl& j = *job->impl_;
  j.config = config;
  j.world = world;
  j.coords = coords_of(config.layout, world->rank());
  std::vector<std::pair<std::string, int64_t>> axes;
  for (auto [axis, size] : {std::pair<const char*, int>{"dp", config.layout.dp},
                            {"ep", config.layout.ep},
                            {"tp", config.layout.tp}}) {
    if (size > 1) axes.emplace_back(axis, size);
  }
  if (!axes.empty()) {
    auto mesh = dist::DeviceMesh::create(world, axes);
    auto axis = [&](const char* name, int size) {
      return size > 1 ? mesh.group(name) : std::shared_ptr<dist::ProcessGroup>();
    };
    j.dp = axis("dp", config.layout.dp);
    j.ep = axis("ep", config.layout.ep);
    j.tp = axis("tp", config.layout.tp);
  }
  j.model = std::make_unique<nn::Transformer>(config.model, nn::ParallelGroups{j.tp, j.ep});
  j.model->init_random(config.seed);
  nn::TrainerOptions opts;
  opts.steps = config.steps;
  opts.lr = config.lr;
  opts.min_lr = config.min_lr;
  opts.warmup = config.warmup;
  opts.max_grad_norm = config.max_grad_norm;
  opts.grad_accumulation = config.grad_accumulation;
  opts.zero1 = config.zero1;
  opts.bf16_autocast = config.bf16_autocast;
  opts.adamw = config.adamw;
  j.trainer = std::make_unique<nn::Trainer>(*j.model, opts, j.dp);
  if (!config.token_file.empty()) {
    j.tokens = std::make_unique<nn::TokenDataset>(
        nn::TokenDataset::open(config.token_file, config.bytes_per_token));
  }
  return job;
}

const TrainingJobConfig& TrainingJob::config() const { return impl_->config; }
int TrainingJob::rank() const { return impl_->world->rank(); }
RankCoords TrainingJob::coords() const { return impl_->coords; }
nn::Transformer& TrainingJob::model() { return *impl_->model; }
nn::Trainer& TrainingJob::trainer() { return *impl_->trainer; }
const std::shared_ptr<dist::ProcessGroup>& TrainingJob::world() const { return impl_->world; }

std::shared_ptr<dist::ProcessGroup> TrainingJob::axis_group(const std::string& axis) const {
  if (axis == "dp") return impl_->dp;
  if (axis == "tp") return impl_->tp;
  if (axis == "ep") return impl_->ep;
  TESSERA_THROW(NotFound, "training job: no mesh axis '", axis, "' (axes: dp, tp, ep)");
}

nn::TokenDataset::Batch TrainingJob::batch(int64_t step) const {
  const Impl& j = *impl_;
  const TrainingJobConfig& c = j.config;
  const int data_rank = j.coords.dp * c.layout.ep + j.coords.ep;
  if (j.tokens) {
    return j.tokens->batch(step, c.global_batch, c.seq_len, data_rank, c.data_ranks(), c.data_seed);
  }
  // Synthetic: uniform ids, a function of (seed, step, data rank) only.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(c.data_seed * 1000003ULL +
                                                      static_cast<uint64_t>(step) * 7919ULL +
                                                      static_cast<uint64_t>(data_rank));
  at::Tensor ids =
      at::randint(0, c.model.vocab_size, {c.local_batch(), c.seq_len + 1}, gen, at::kLong);
  return {ids.narrow(1, 0, c.seq_len).contiguous(), ids.narrow(1, 1, c.seq_len).contiguous()};
}

nn::StepStats TrainingJob::step(int64_t step) { return this->step(batch(step)); }

nn::StepStats TrainingJob::step(const nn::TokenDataset::Batch& b) {
  return impl_->trainer->step(b.input_ids, b.labels);
}

// ---------------------------------------------------------------------------
// Timed runs

using detail::median;

void CommunicationClock::on_issue(const dist::CollectiveCall& call) {
  const Clock::time_point now = Clock::now();
  std::lock_guard<std::mutex> lock(mu_);
  if (!open_) return;
  if (outstanding_.empty()) busy_since_ = now;
  CollectiveTime what{call.op, call.bytes, static_cast<int>(call.ranks.size())};
  what.start_seconds = std::chrono::duration<double>(now - window_start_).count();
  // The group's two lowest ranks, without allocating on the issue path.
  what.first_rank = call.ranks.empty() ? 0 : call.ranks[0];
  for (int r : call.ranks) what.first_rank = std::min(what.first_rank, r);
  for (int r : call.ranks) {
    if (r != what.first_rank && (what.second_rank < 0 || r < what.second_rank)) {
      what.second_rank = r;
    }
  }
  outstanding_.push_back(Pending{call.id, std::move(what), now});
  ++calls_;
}

void CommunicationClock::on_complete(const dist::CollectiveCall& call) {
  const Clock::time_point now = Clock::now();
  std::lock_guard<std::mutex> lock(mu_);
  auto it = std::find_if(outstanding_.begin(), outstanding_.end(),
                         [&](const Pending& p) { return p.id == call.id; });
  if (it == outstanding_.end()) return;  // issued before the window
  it->what.seconds = std::chrono::duration<double>(now - it->issued).count();
  done_.push_back(std::move(it->what));
  outstanding_.erase(it);
  if (outstanding_.empty()) {
    total_ += std::chrono::duration<double>(now - busy_since_).count();
  }
}

void CommunicationClock::start() {
  std::lock_guard<std::mutex> lock(mu_);
  open_ = true;
  window_start_ = Clock::now();
  outstanding_.clear();
  done_.clear();
  total_ = 0;
  calls_ = 0;
}

double CommunicationClock::stop() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!outstanding_.empty()) {
    total_ += std::chrono::duration<double>(Clock::now() - busy_since_).count();
    outstanding_.clear();
  }
  open_ = false;
  return total_;
}

int CommunicationClock::calls() const {
  std::lock_guard<std::mutex> lock(mu_);
  return calls_;
}

std::vector<CollectiveTime> CommunicationClock::operations() const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_;
}

namespace {

// Per measured step: the slowest rank's communication time, and the rest of
// its step.
std::pair<std::vector<double>, std::vector<double>> slowest_rank_split(const StepTimings& t) {
  std::vector<double> comm, compute;
  for (size_t s = 0; s < t.rank_step_seconds.size() && s < t.rank_comm_seconds.size(); ++s) {
    const auto& steps = t.rank_step_seconds[s];
    if (steps.empty() || t.rank_comm_seconds[s].size() != steps.size()) continue;
    const size_t r =
        static_cast<size_t>(std::max_element(steps.begin(), steps.end()) - steps.begin());
    comm.push_back(t.rank_comm_seconds[s][r]);
    compute.push_back(steps[r] - t.rank_comm_seconds[s][r]);
  }
  return {comm, compute};
}

// The operation names a rank may meet (dist::CollectiveCall::op), by the
// index the ranks exchange; anything else is "other".
constexpr const char* kOps[] = {"all_reduce", "broadcast", "all_gather", "reduce_scatter",
                                "all_to_all", "send",      "recv",       "barrier"};
constexpr int kNumOps = static_cast<int>(sizeof(kOps) / sizeof(kOps[0]));

// Every rank's operations, gathered once after the timed steps (rows of
// op index, bytes, group size, seconds, start, step, the group's two lowest
// ranks, in slots only the owning rank fills), by rank.
std::vector<MeasuredOperation> gather_operations(dist::ProcessGroup& world,
                                                 const std::vector<MeasuredOperation>& mine) {
  constexpr int kCols = 8;
  const int n = world.size();
  at::Tensor count = at::full({1}, static_cast<double>(mine.size()), at::kDouble);
  world.all_reduce(count, dist::ReduceOp::kMax).wait();
  const int64_t rows = static_cast<int64_t>(count.item<double>());
  if (rows == 0) return {};
  at::Tensor table = at::zeros({n, rows, kCols}, at::kDouble);
  table.select(0, world.rank()).select(1, 0).fill_(-1);  // op index -1: no row
  double* p = table.select(0, world.rank()).data_ptr<double>();
  for (size_t i = 0; i < mine.size(); ++i) {
    const CollectiveTime& c = mine[i].what;
    const int op = static_cast<int>(std::find(kOps, kOps + kNumOps, c.op) - kOps);
    double* row = p + kCols * i;
    row[0] = op;
    row[1] = static_cast<double>(c.bytes);
    row[2] = c.group_size;
    row[3] = c.seconds;
    row[4] = c.start_seconds;
    row[5] = mine[i].step;
    row[6] = c.first_rank;
    row[7] = c.second_rank;
  }
  // Each rank filled only its own slot (unused rows marked -1), so the sum
  // over ranks holds every rank's rows.
  world.all_reduce(table, dist::ReduceOp::kSum).wait();
  std::vector<MeasuredOperation> out;
  const double* all = table.data_ptr<double>();
  for (int64_t row = 0; row < n * rows; ++row) {
    const double* r = all + kCols * row;
    if (r[0] < 0) continue;
    const int op = static_cast<int>(r[0]);
    MeasuredOperation m;
    m.rank = static_cast<int>(row / rows);
    m.step = static_cast<int>(r[5]);
    m.what.op = op < kNumOps ? kOps[op] : "other";
    m.what.bytes = static_cast<int64_t>(r[1]);
    m.what.group_size = static_cast<int>(r[2]);
    m.what.seconds = r[3];
    m.what.start_seconds = r[4];
    m.what.first_rank = static_cast<int>(r[6]);
    m.what.second_rank = static_cast<int>(r[7]);
    out.push_back(std::move(m));
  }
  return out;
}

// The operations grouped by kind (op, group size, bytes).
std::vector<CollectiveTiming> collective_times(const std::vector<MeasuredOperation>& operations) {
  std::map<std::tuple<std::string, int, int64_t>, std::vector<double>> by_kind;
  for (const MeasuredOperation& m : operations) {
    by_kind[{m.what.op, m.what.group_size, m.what.bytes}].push_back(m.what.seconds);
  }
  std::vector<CollectiveTiming> out;
  for (const auto& [key, seconds] : by_kind) {
    CollectiveTiming c;
    std::tie(c.op, c.group_size, c.bytes) = key;
    c.calls = static_cast<int>(seconds.size());
    c.median_seconds = median(seconds);
    c.min_seconds = *std::min_element(seconds.begin(), seconds.end());
    c.max_seconds = *std::max_element(seconds.begin(), seconds.end());
    out.push_back(std::move(c));
  }
  return out;
}

}  // namespace

double StepTimings::median_comm_seconds() const { return median(slowest_rank_split(*this).first); }

double StepTimings::median_compute_seconds() const {
  return median(slowest_rank_split(*this).second);
}

StepTimings run_timed_steps(TrainingJob& job, const RunOptions& options) {
  TESSERA_CHECK(options.warmup_steps >= 0 && options.measured_steps >= 1, InvalidArgument,
                "run_timed_steps: warmup_steps must be >= 0 and measured_steps >= 1");
  dist::ProcessGroup& world = *job.world();
  StepTimings t;
  t.world_size = world.size();
  t.layout = job.config().layout.to_string();
  const int total = options.warmup_steps + options.measured_steps;
  const int n = world.size();
  const int me = world.rank();
  std::vector<MeasuredOperation> mine;  // this rank's operations in the measured steps
  for (int s = 0; s < total; ++s) {
    nn::TokenDataset::Batch b = job.batch(s);
    world.barrier().wait();
    if (options.clock) options.clock->start();
    Stopwatch watch;
    nn::StepStats stats = job.step(b);
    const double elapsed = watch.seconds();
    const double comm = options.clock ? options.clock->stop() : 0.0;
    // Every rank's step and communication times, gathered by a sum over
    // slots only the owning rank fills.
    at::Tensor times = at::zeros({2, n}, at::kDouble);
    times[0][me] = elapsed;
    times[1][me] = comm;
    world.all_reduce(times, dist::ReduceOp::kSum).wait();
    if (s >= options.warmup_steps) {
      auto* p = times.data_ptr<double>();
      t.step_seconds.push_back(*std::max_element(p, p + n));
      t.losses.push_back(stats.loss);
      if (options.clock) {
        t.rank_step_seconds.emplace_back(p, p + n);
        t.rank_comm_seconds.emplace_back(p + n, p + 2 * n);
        for (CollectiveTime& c : options.clock->operations()) {
          mine.push_back(MeasuredOperation{me, s - options.warmup_steps, std::move(c)});
        }
      }
    }
  }
  if (options.clock) {
    t.operations = gather_operations(world, mine);
    t.collectives = collective_times(t.operations);
  }
  t.median_seconds = median(t.step_seconds);
  t.min_seconds = *std::min_element(t.step_seconds.begin(), t.step_seconds.end());
  t.max_seconds = *std::max_element(t.step_seconds.begin(), t.step_seconds.end());
  return t;
}

std::string StepTimings::to_json(int warmup_steps) const {
  nlohmann::ordered_json j;
  j["schema"] = "tessera.sim.step_timings/1";
  j["layout"] = layout;
  j["world_size"] = world_size;
  j["warmup_steps"] = warmup_steps;
  j["step_seconds"] = step_seconds;
  j["losses"] = losses;
  j["median_seconds"] = median_seconds;
  j["min_seconds"] = min_seconds;
  j["max_seconds"] = max_seconds;
  if (!rank_step_seconds.empty()) {
    j["rank_step_seconds"] = rank_step_seconds;
    j["rank_comm_seconds"] = rank_comm_seconds;
  }
  if (!collectives.empty()) {
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const CollectiveTiming& c : collectives) {
      list.push_back({{"op", c.op},
                      {"bytes", c.bytes},
                      {"group_size", c.group_size},
                      {"calls", c.calls},
                      {"median_seconds", c.median_seconds},
                      {"min_seconds", c.min_seconds},
                      {"max_seconds", c.max_seconds}});
    }
    j["collectives"] = std::move(list);
  }
  return j.dump(2) + "\n";
}

StepTimings StepTimings::parse(std::string_view text, const std::string& source) {
  detail::json root = detail::parse_json(text, source);
  detail::JsonObject o(root, source);
  const std::string schema = o.get_string("schema");
  TESSERA_CHECK(schema == "tessera.sim.step_timings/1", InvalidArgument, source,
                ": schema: expected \"tessera.sim.step_timings/1\", got \"", schema, "\"");
  StepTimings t;
  t.layout = o.get_string("layout");
  t.world_size = static_cast<int>(o.get_int("world_size"));
  o.get_int("warmup_steps");
  auto doubles = [&](const char* key) {
    std::vector<double> out;
    for (const auto& v : o.get_array(key)) {
      if (!v.is_number()) o.fail(key, "expected a list of numbers, found " + v.dump());
      out.push_back(v.get<double>());
    }
    return out;
  };
  t.step_seconds = doubles("step_seconds");
  t.losses = doubles("losses");
  TESSERA_CHECK(!t.step_seconds.empty(), InvalidArgument, source, ": step_seconds is empty");
  t.median_seconds = o.get_double("median_seconds");
  t.min_seconds = o.get_double("min_seconds");
  t.max_seconds = o.get_double("max_seconds");
  // Per step, one number per rank (optional; written with a clock).
  auto per_rank = [&](const char* key) {
    std::vector<std::vector<double>> out;
    if (!o.has(key)) return out;
    for (const auto& step : o.get_array(key)) {
      if (!step.is_array() || static_cast<int>(step.size()) != t.world_size) {
        o.fail(key, "expected one list of " + std::to_string(t.world_size) +
                        " numbers per step, found " + step.dump());
      }
      std::vector<double> row;
      for (const auto& v : step) {
        if (!v.is_number()) o.fail(key, "expected numbers, found " + v.dump());
        row.push_back(v.get<double>());
      }
      out.push_back(std::move(row));
    }
    return out;
  };
  t.rank_step_seconds = per_rank("rank_step_seconds");
  t.rank_comm_seconds = per_rank("rank_comm_seconds");
  TESSERA_CHECK(
      t.rank_step_seconds.size() == t.rank_comm_seconds.size() &&
          (t.rank_step_seconds.empty() || t.rank_step_seconds.size() == t.step_seconds.size()),
      InvalidArgument, source,
      ": rank_step_seconds and rank_comm_seconds need one entry per measured step");
  if (o.has("collectives")) {
    const detail::json& list = o.get_array("collectives");
    for (size_t i = 0; i < list.size(); ++i) {
      detail::JsonObject e(list[i], source, "collectives[" + std::to_string(i) + "]");
      CollectiveTiming c;
      c.op = e.get_string("op");
      c.bytes = e.get_size("bytes");
      c.group_size = static_cast<int>(e.get_size("group_size"));
      c.calls = static_cast<int>(e.get_size("calls"));
      c.median_seconds = e.get_nonnegative("median_seconds");
      c.min_seconds = e.get_nonnegative("min_seconds");
      c.max_seconds = e.get_nonnegative("max_seconds");
      e.check_keys();
      t.collectives.push_back(std::move(c));
    }
  }
  o.check_keys();
  return t;
}

namespace {

// "0,2,...": a group by its two lowest ranks (evenly spaced mesh groups).
std::string group_name(const CollectiveTime& c) {
  std::string name = std::to_string(c.first_rank);
  if (c.second_rank >= 0) name += "," + std::to_string(c.second_rank);
  if (c.group_size > 2) name += ",...";
  return name;
}

}  // namespace

std::string measured_chrome_trace_json(const StepTimings& timings) {
  using nlohmann::json;
  // A clock leaves each step's per-rank times (a one-rank job may still
  // have no operations to draw).
  TESSERA_CHECK(!timings.rank_step_seconds.empty(), InvalidArgument,
                "measured_chrome_trace_json: the timings hold no per-rank steps (time the run "
                "with a CommunicationClock)");
  // Step s starts after the slowest ranks of the steps before it.
  std::vector<double> step_start(timings.step_seconds.size() + 1, 0.0);
  for (size_t s = 0; s < timings.step_seconds.size(); ++s) {
    step_start[s + 1] = step_start[s] + timings.step_seconds[s];
  }
  std::vector<MeasuredOperation> ops = timings.operations;
  std::stable_sort(ops.begin(), ops.end(),
                   [](const MeasuredOperation& a, const MeasuredOperation& b) {
                     return std::tie(a.rank, a.step, a.what.start_seconds) <
                            std::tie(b.rank, b.step, b.what.start_seconds);
                   });
  json events = json::array();
  auto name_thread = [&events](int rank, int tid, const std::string& name) {
    events.push_back({{"ph", "M"},
                      {"name", "thread_name"},
                      {"pid", rank},
                      {"tid", tid},
                      {"args", {{"name", name}}}});
  };
  for (int rank = 0; rank < timings.world_size; ++rank) {
    events.push_back({{"ph", "M"},
                      {"name", "process_name"},
                      {"pid", rank},
                      {"args", {{"name", "rank " + std::to_string(rank) + " (measured)"}}}});
    name_thread(rank, 0, "step");
    name_thread(rank, 1, "communication");
    for (size_t s = 0; s < timings.rank_step_seconds.size(); ++s) {
      if (static_cast<size_t>(rank) >= timings.rank_step_seconds[s].size()) continue;
      events.push_back({{"ph", "X"},
                        {"name", "step " + std::to_string(s)},
                        {"cat", "step"},
                        {"pid", rank},
                        {"tid", 0},
                        {"ts", step_start[s] * 1e6},
                        {"dur", timings.rank_step_seconds[s][static_cast<size_t>(rank)] * 1e6}});
    }
  }
  // Operations of one rank that overlap in time go to further threads: the
  // first whose previous operation has ended.
  int rank = -1;
  std::vector<double> lane_end;
  int named_lanes = 1;
  for (const MeasuredOperation& m : ops) {
    TESSERA_CHECK(m.rank >= 0 && m.rank < timings.world_size && m.step >= 0 &&
                      static_cast<size_t>(m.step) < timings.step_seconds.size(),
                  InvalidArgument, "measured_chrome_trace_json: an operation of rank ", m.rank,
                  " in step ", m.step, " is outside the ", timings.world_size, " ranks and ",
                  timings.step_seconds.size(), " steps");
    if (m.rank != rank) {
      rank = m.rank;
      lane_end.clear();
      named_lanes = 1;
    }
    const double start = (step_start[static_cast<size_t>(m.step)] + m.what.start_seconds) * 1e6;
    const double end = start + m.what.seconds * 1e6;
    size_t lane = 0;
    while (lane < lane_end.size() && lane_end[lane] > start) ++lane;
    if (lane == lane_end.size()) lane_end.push_back(end);
    lane_end[lane] = end;
    const int tid = 1 + static_cast<int>(lane);
    if (tid > named_lanes) {
      name_thread(rank, tid, "communication " + std::to_string(tid));
      named_lanes = tid;
    }
    events.push_back({{"ph", "X"},
                      {"name", m.what.op},
                      {"cat", "communication"},
                      {"pid", rank},
                      {"tid", tid},
                      {"ts", start},
                      {"dur", m.what.seconds * 1e6},
                      {"args",
                       {{"bytes", m.what.bytes},
                        {"group_size", m.what.group_size},
                        {"group", group_name(m.what)},
                        {"step", m.step}}}});
  }
  return json({{"traceEvents", std::move(events)}, {"displayTimeUnit", "ms"}}).dump() + "\n";
}

}  // namespace tessera::sim
