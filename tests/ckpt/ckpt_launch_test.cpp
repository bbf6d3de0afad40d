// Checkpoints across real processes: save in one tessera-launch job, load in
// others at different world sizes and layouts; training resumed at another
// layout; a rank killed mid-save; the tessera-ckpt tool on what the jobs
// wrote; Hugging Face export.
// Needs TESSERA_LAUNCH_BIN, TESSERA_CKPT_PROGRAM (ckpt_rank_program) and
// TESSERA_CKPT_TOOL (tessera-ckpt) defined by the build.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "tessera/ckpt/checkpoint.h"
#include "tessera/core/subprocess.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/model.h"
#include "tessera/nn/train.h"

namespace fs = std::filesystem;

namespace tessera::ckpt {
namespace {

struct Outcome {
  int code = -1;
  std::string output;
};

// Runs a shell command line, capturing stdout and stderr.
Outcome run(const std::string& cmd) {
  CommandResult c = run_shell(cmd, std::chrono::minutes(10));
  return {c.status.shell_code(), c.output};
}

Outcome launch(int nproc, const std::string& args) {
  return run(std::string(TESSERA_LAUNCH_BIN) + " --nproc " + std::to_string(nproc) +
             " --grace 2 -- " + TESSERA_CKPT_PROGRAM + " " + args);
}

Outcome tool(const std::string& args) { return run(std::string(TESSERA_CKPT_TOOL) + " " + args); }

class CkptLaunchTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = new_root();  // per process; removed in TearDownTestSuite
    fs::create_directories(root_);
  }
  static void TearDownTestSuite() { fs::remove_all(root_); }
  // Every committed checkpoint a test wrote passes `tessera-ckpt verify`
  // and `inspect --json` (except those it corrupted on purpose).
  void TearDown() override {
    for (const auto& entry : fs::recursive_directory_iterator(root_)) {
      if (entry.path().filename() != kMetadataFile) continue;
      const std::string dir = entry.path().parent_path().string();
      if (!checked_.insert(dir).second || corrupted_.count(dir)) continue;
      Outcome v = tool("verify " + dir);
      EXPECT_EQ(v.code, 0) << dir << "\n" << v.output;
      Outcome i = tool("inspect " + dir + " --json");
      ASSERT_EQ(i.code, 0) << dir << "\n" << i.output;
      auto j = nlohmann::json::parse(i.output);
      EXPECT_EQ(j["step"].get<int64_t>(), read_metadata(dir).step) << dir;
      EXPECT_FALSE(j["tensors"].empty()) << dir;
    }
  }
  static std::string new_root() {
    return (fs::path(::testing::TempDir()) / ("tessera_ckpt_mp_" + std::to_string(getpid())))
        .string();
  }
  static std::string root_;
  static std::set<std::string> checked_, corrupted_;
};
std::string CkptLaunchTest::root_;
std::set<std::string> CkptLaunchTest::checked_, CkptLaunchTest::corrupted_;

// tp2 x dp2 with ZeRO-1 flat optimizer shards, loaded at tp1 x dp2, one
// rank and tp4: every tensor equals the reference bit for bit.
TEST_F(CkptLaunchTest, DenseSavedAtWorld4LoadsAtOtherWorldSizes) {
  const std::string root = root_ + "/dense";
  Outcome s = launch(4, "save " + root + " 100 llama 2 1 2");
  ASSERT_EQ(s.code, 0) << s.output;
  const std::string dir = step_dir(root, 100);
  for (auto [nproc, tp, dp] : std::vector<std::array<int, 3>>{{2, 1, 2}, {1, 1, 1}, {4, 4, 1}}) {
    SCOPED_TRACE("tp" + std::to_string(tp) + " dp" + std::to_string(dp));
    Outcome l =
        launch(nproc, "load " + dir + " llama " + std::to_string(tp) + " 1 " + std::to_string(dp));
    EXPECT_EQ(l.code, 0) << l.output;
  }
}

TEST_F(CkptLaunchTest, MoeSavedAtEp2LoadsAtOtherExpertParallelism) {
  const std::string root = root_ + "/moe";
  Outcome s = launch(4, "save " + root + " 100 mixtral 2 2 1");
  ASSERT_EQ(s.code, 0) << s.output;
  const std::string dir = step_dir(root, 100);
  for (auto [nproc, tp, ep, dp] :
       std::vector<std::array<int, 4>>{{4, 1, 4, 1}, {2, 2, 1, 1}, {1, 1, 1, 1}}) {
    SCOPED_TRACE("tp" + std::to_string(tp) + " ep" + std::to_string(ep) + " dp" +
                 std::to_string(dp));
    Outcome l = launch(nproc, "load " + dir + " mixtral " + std::to_string(tp) + " " +
                                  std::to_string(ep) + " " + std::to_string(dp));
    EXPECT_EQ(l.code, 0) << l.output;
  }
}

// "ckpt-loss <step> <loss>" lines of a train job, by step.
std::map<int64_t, double> losses_of(const std::string& output) {
  std::map<int64_t, double> out;
  std::istringstream lines(output);
  std::string line;
  while (std::getline(lines, line)) {
    auto at = line.find("ckpt-loss ");
    if (at == std::string::npos) continue;
    long long step = 0;
    double loss = 0;
    if (std::sscanf(line.c_str() + at, "ckpt-loss %lld %lf", &step, &loss) == 2) out[step] = loss;
  }
  return out;
}

// The acceptance test: training resumed after a reshard continues
// with the same loss sequence as an uninterrupted run (fp32). tp2 x dp2 with
// ZeRO-1 trains 12 steps straight; a second tp2 x dp2 job saves
// asynchronously at steps 5 (copying) and 6 (deferred copy) and trains on
// while the saves are written; jobs at other layouts resume from those
// checkpoints and run to step 11.
TEST_F(CkptLaunchTest, TrainingResumedAfterReshardContinuesWithTheSameLosses) {
  const std::string data = root_ + "/tokens.bin";
  {
    // A learnable stream over the 101-token vocabulary: a repeating phrase
    // with a slowly drifting offset.
    std::vector<int64_t> ids(20000);
    for (size_t i = 0; i < ids.size(); ++i)
      ids[i] = static_cast<int64_t>((i % 23) * 4 + i / 997) % 101;
    nn::TokenDataset::write(data, ids);
  }
  auto train = [&](int nproc, const std::string& root, int tp, int dp, bool zero1, int first,
                   int last, int save_at) {
    return launch(nproc, "train " + root + " " + data + " " + std::to_string(tp) + " " +
                             std::to_string(dp) + " " + (zero1 ? "1" : "0") + " " +
                             std::to_string(first) + " " + std::to_string(last) + " " +
                             std::to_string(save_at));
  };
  Outcome straight = train(4, root_ + "/train_straight", 2, 2, true, 0, 12, -1);
  ASSERT_EQ(straight.code, 0) << straight.output;
  auto want = losses_of(straight.output);
  ASSERT_EQ(want.size(), 12u) << straight.output;
  EXPECT_LT(want.at(11), want.at(0));  // it does learn

  const std::string root = root_ + "/train_resumed";
  Outcome saving = train(4, root, 2, 2, true, 0, 8, 6);
  ASSERT_EQ(saving.code, 0) << saving.output;
  ASSERT_TRUE(fs::exists(step_dir(root, 5) + "/" + kMetadataFile)) << saving.output;
  ASSERT_TRUE(fs::exists(step_dir(root, 6) + "/" + kMetadataFile)) << saving.output;
  // Saving (asynchronously, while training went on) changed nothing.
  auto before = losses_of(saving.output);
  ASSERT_EQ(before.size(), 8u) << saving.output;
  for (int64_t s = 0; s < 8; ++s) EXPECT_EQ(before.at(s), want.at(s)) << "step " << s;

  // The copying save of step 5, resumed in the same layout: bit for bit.
  {
    SCOPED_TRACE("resumed from step 5 at tp2 dp2 zero1");
    Outcome o = train(4, root, 2, 2, true, 5, 12, -1);
    ASSERT_EQ(o.code, 0) << o.output;
    auto got = losses_of(o.output);
    ASSERT_EQ(got.size(), 7u) << o.output;
    for (int64_t s = 5; s < 12; ++s) EXPECT_EQ(got.at(s), want.at(s)) << "step " << s;
  }
  // The deferred-copy save of step 6 (written from the live tensors while
  // step 6 ran its forward and backward passes), resumed at every layout.
  struct Resume {
    int nproc, tp, dp;
    bool zero1;
  };
  for (Resume r : {Resume{4, 2, 2, true}, Resume{1, 1, 1, false}, Resume{2, 1, 2, true},
                   Resume{2, 1, 2, false}, Resume{2, 2, 1, false}}) {
    const bool same_layout = r.tp == 2 && r.dp == 2 && r.zero1;
    SCOPED_TRACE("resumed at tp" + std::to_string(r.tp) + " dp" + std::to_string(r.dp) +
                 (r.zero1 ? " zero1" : ""));
    Outcome o = train(r.nproc, root, r.tp, r.dp, r.zero1, 6, 12, -1);
    ASSERT_EQ(o.code, 0) << o.output;
    auto got = losses_of(o.output);
    ASSERT_EQ(got.size(), 6u) << o.output;
    for (int64_t s = 6; s < 12; ++s) {
      if (same_layout) {
        EXPECT_EQ(got.at(s), want.at(s)) << "step " << s;  // bit for bit
      } else {
        EXPECT_NEAR(got.at(s), want.at(s), 1e-5 * std::abs(want.at(s))) << "step " << s;
      }
    }
  }
}

TEST_F(CkptLaunchTest, RankKilledMidSaveLeavesLastCheckpointLoadable) {
  const std::string root = root_ + "/killed";
  ASSERT_EQ(launch(4, "save " + root + " 100 llama 2 1 2").code, 0);
  Outcome k = launch(4, "save " + root + " 200 llama 2 1 2 2");
  EXPECT_NE(k.code, 0) << k.output;
  EXPECT_NE(k.output.find("dying in the middle of the save"), std::string::npos) << k.output;
  EXPECT_FALSE(fs::exists(step_dir(root, 200)));
  ASSERT_TRUE(latest(root).has_value());
  EXPECT_EQ(*latest(root), step_dir(root, 100));
  Outcome l = launch(2, "load " + *latest(root) + " llama 1 1 2");
  EXPECT_EQ(l.code, 0) << l.output;
}

TEST_F(CkptLaunchTest, ToolVerifiesInspectsReshardsAndExports) {
  const std::string root = root_ + "/tool";
  ASSERT_EQ(launch(4, "save " + root + " 100 llama 2 1 2").code, 0);
  const std::string dir = step_dir(root, 100);

  Outcome v = tool("verify " + dir);
  EXPECT_EQ(v.code, 0) << v.output;
  EXPECT_NE(v.output.find("OK"), std::string::npos) << v.output;

  Outcome i = tool("inspect " + dir + " --json");
  ASSERT_EQ(i.code, 0) << i.output;
  auto j = nlohmann::json::parse(i.output);
  EXPECT_EQ(j["format_version"], 1);
  EXPECT_EQ(j["world_size"], 4);
  EXPECT_EQ(j["step"], 100);
  EXPECT_TRUE(j["tensors"].contains("model.embed_tokens.weight"));
  EXPECT_TRUE(j["tensors"].contains("optim.exp_avg/model.embed_tokens.weight"));
  EXPECT_EQ(tool("inspect " + dir).code, 0);

  // Offline reshard to tp1 x dp2, then a job of that shape loads it.
  const std::string out = root_ + "/tool_resharded";
  Outcome r = tool("reshard " + dir + " " + out + " --tp 1 --dp 2");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(read_metadata(out).world_size, 2);
  EXPECT_EQ(tool("verify " + out).code, 0);
  Outcome l = launch(2, "load " + out + " llama 1 1 2");
  EXPECT_EQ(l.code, 0) << l.output;

  // Hugging Face export loads back with identical logits.
  const std::string hf = root_ + "/tool_hf";
  Outcome e = tool("export-hf " + dir + " " + hf);
  ASSERT_EQ(e.code, 0) << e.output;
  nn::Transformer loaded = nn::load_hf_model(hf);
  nn::ModelConfig cfg = loaded.config();
  nn::Transformer reference(cfg);
  reference.init_random(1234);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  at::Tensor ids = at::randint(0, cfg.vocab_size, {2, 9}, gen, at::kLong);
  EXPECT_TRUE(at::equal(loaded.forward(ids).logits, reference.forward(ids).logits));

  // A corrupted file makes verify fail, naming it.
  corrupted_.insert(dir);
  {
    FILE* f = fopen((dir + "/rank_00001.bin").c_str(), "r+b");
    ASSERT_NE(f, nullptr);
    fseek(f, 10, SEEK_SET);
    int c = fgetc(f);
    fseek(f, 10, SEEK_SET);
    fputc(c ^ 0xFF, f);
    fclose(f);
  }
  Outcome bad = tool("verify " + dir);
  EXPECT_EQ(bad.code, 1) << bad.output;
  EXPECT_NE(bad.output.find("rank_00001.bin"), std::string::npos) << bad.output;
  EXPECT_EQ(tool("inspect /nonexistent/ckpt").code, 3);
}

}  // namespace
}  // namespace tessera::ckpt
