// The single-controller runtime on real processes: a driver spawns worker
// pools that serve gRPC on loopback; calls apply the transfer protocols
// (split, padding, collect) to batches that stay on the workers; bad
// requests get clear statuses; a dead or hung worker stops the run, named by
// role and rank, with no process left behind.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <signal.h>
#include <unistd.h>
#include "test_main.h"

#include <chrono>
#include <limits>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/core/runtime.h"
#include "tessera/rlhf/driver.h"
#include "tessera/rlhf/worker.grpc.pb.h"
#include "tessera/rpc/rpc.h"

namespace tessera::rlhf {
namespace {

// A role whose methods are plain arithmetic on the rows, with a collective
// inside so the SPMD group is exercised: tp (config) workers per dp rank.
class MathRole : public Role {
 public:
  void setup(WorkerContext& ctx, MethodTable& methods) override {
    const int tp = static_cast<int>(ctx.config.get_int("tp", 1));
    group_ = ctx.group;
    MethodMesh mesh{ctx.size / tp, tp, ctx.rank / tp, ctx.rank % tp};
    // y = x * factor, `repeat` output rows per input row; metric: rows seen
    // by all workers together (an all-reduce over the group).
    methods.add("scale", Protocol::kDpCompute, mesh,
                [this, mesh](const Batch& in, const ConfigObject& args) {
                  const double factor = args.get_double("factor");
                  const int64_t repeat = args.get_int("repeat", 1);
                  at::Tensor x = in.count("x") ? in.at("x") : in.at("y");
                  at::Tensor rows = at::full({1}, static_cast<double>(x.size(0)), at::kDouble);
                  if (group_) group_->all_reduce(rows).wait();
                  MethodResult r;
                  r.output["y"] = (x * factor).repeat_interleave(repeat, 0);
                  r.output["dp"] = at::full({x.size(0) * repeat}, mesh.dp_rank, at::kLong);
                  r.metrics["rows_all_workers"] = rows.item<double>();
                  r.metrics["rows"] = static_cast<double>(x.size(0));
                  return r;
                });
    methods.add("sum", Protocol::kRankZero, mesh, [](const Batch& in, const ConfigObject&) {
      MethodResult r;
      r.metrics["sum"] = in.at("y").sum().item<double>();
      r.metrics["rows"] = static_cast<double>(in.at("y").size(0));
      return r;
    });
    methods.add("rows_everywhere", Protocol::kOneToAll, mesh,
                [](const Batch& in, const ConfigObject&) {
                  MethodResult r;
                  r.metrics["rows"] = in.empty() ? 0.0 : static_cast<double>(batch_rows(in));
                  return r;
                });
    methods.add("negate", Protocol::kAllToAll, mesh, [](const Batch& in, const ConfigObject&) {
      return MethodResult{{{"x", -in.at("x")}}, {}};
    });
    methods.add("sleep", Protocol::kOneToAll, mesh, [](const Batch&, const ConfigObject& args) {
      std::this_thread::sleep_for(std::chrono::duration<double>(args.get_double("seconds")));
      return MethodResult{};
    });
  }

 private:
  std::shared_ptr<dist::ProcessGroup> group_;
};

RoleRegistry test_roles() {
  RoleRegistry r;
  r.add("math", [] { return std::make_unique<MathRole>(); });
  return r;
}

at::Tensor rows_tensor(int64_t n) { return at::arange(n * 3, at::kFloat).view({n, 3}); }

bool process_alive(long pid) { return ::kill(static_cast<pid_t>(pid), 0) == 0; }

TEST(Runtime, ProtocolsSplitPadAndCollectOnColocatedRoles) {
  DriverOptions o;
  o.pools = {{"all", 4}};
  o.roles = {{"a", "math", "all", R"({"tp": 2})"}, {"b", "math", "all", R"({"tp": 1})"}};
  Driver driver(o);
  auto a = driver.group("a");
  auto b = driver.group("b");
  for (int64_t n : {1, 2, 7, 8, 13}) {
    SCOPED_TRACE(testing::Message() << n << " rows");
    BatchRef x = driver.put("x" + std::to_string(n), {{"x", rows_tensor(n)}});
    // DP_COMPUTE over dp 2 (tp 2): chunks of ceil(n/2), the last padded.
    CallResult ra = a.call("scale", {x}, Args().set("factor", 2.0).set("repeat", int64_t{3})).get();
    ASSERT_EQ(ra.output.rows, 3 * n);
    Batch ya = driver.get(ra.output);
    EXPECT_TRUE(at::equal(ya.at("y"), (rows_tensor(n) * 2).repeat_interleave(3, 0)));
    const int64_t chunk = (n + 1) / 2;
    at::Tensor expected_dp = at::arange(n, at::kLong).div(chunk, "floor").repeat_interleave(3);
    EXPECT_TRUE(at::equal(ya.at("dp"), expected_dp));
    ASSERT_EQ(ra.metrics.size(), 2u);  // tp-rank-0 workers only
    EXPECT_EQ(ra.metric("rows_all_workers"),
              4.0 * chunk);  // every worker got a full (padded) chunk
    // b (dp 4) reads a's output where it lies, on other processes.
    CallResult rb = b.call("scale", {ra.output}, Args().set("factor", -1.0)).get();
    ASSERT_EQ(rb.metrics.size(), 4u);
    EXPECT_TRUE(at::equal(driver.get(rb.output).at("y"), -ya.at("y")));
    // RANK_ZERO: worker 0 sees the whole batch.
    CallResult sum = b.call("sum", {rb.output}).get();
    ASSERT_EQ(sum.metrics.size(), 1u);
    EXPECT_DOUBLE_EQ(sum.metric("sum"), -ya.at("y").sum().item<double>());
    EXPECT_EQ(sum.metric("rows"), 3.0 * n);
    // ONE_TO_ALL: everyone sees everything, all report.
    CallResult all = a.call("rows_everywhere", {x}).get();
    ASSERT_EQ(all.metrics.size(), 4u);
    for (const auto& m : all.metrics) EXPECT_EQ(m.at("rows"), static_cast<double>(n));
    driver.release("x" + std::to_string(n));
  }
  // ALL_TO_ALL: worker w gets rows [w n/4, (w+1) n/4), results in worker order.
  BatchRef x = driver.put("x8", {{"x", rows_tensor(8)}});
  CallResult neg = b.call("negate", {x}).get();
  EXPECT_TRUE(at::equal(driver.get(neg.output).at("x"), -rows_tensor(8)));
  EXPECT_THROW(b.call("negate", {driver.put("x7", {{"x", rows_tensor(7)}})}), InvalidArgument);
  // Independent calls run concurrently from the driver's side.
  auto f1 = a.call("scale", {x}, Args().set("factor", 1.0));
  auto f2 = b.call("scale", {x}, Args().set("factor", 1.0));
  EXPECT_EQ(f1.get().output.rows, 8);
  EXPECT_EQ(f2.get().output.rows, 8);
  driver.shutdown();
}

TEST(Runtime, SplitPoolsMoveRowsBetweenPoolsAndRejectBadRequests) {
  DriverOptions o;
  o.pools = {{"first", 2}, {"second", 2}};
  o.roles = {{"a", "math", "first", R"({"tp": 1})"}, {"b", "math", "second", R"({"tp": 2})"}};
  o.max_message_bytes = 64 << 10;
  Driver driver(o);
  auto a = driver.group("a");
  auto b = driver.group("b");
  BatchRef x = driver.put("x", {{"x", rows_tensor(5)}});
  CallResult ra = a.call("scale", {x}, Args().set("factor", 3.0)).get();
  CallResult rb = b.call("scale", {ra.output}, Args().set("factor", 0.5)).get();
  EXPECT_TRUE(at::equal(driver.get(rb.output).at("y"), rows_tensor(5) * 1.5));

  // Unknown method: refused by the driver before anything is sent.
  try {
    a.call("scael", {x});
    ADD_FAILURE() << "no error";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("no method 'scael'"), std::string::npos) << e.what();
  }
  // Unknown argument: INVALID_ARGUMENT from every worker; the run goes on.
  try {
    a.call("scale", {x}, Args().set("factor", 1.0).set("fator", 2.0)).get();
    ADD_FAILURE() << "no error";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("fator"), std::string::npos) << e.what();
  }
  // A missing required argument, likewise.
  EXPECT_THROW(a.call("scale", {x}).get(), InvalidArgument);
  // A batch too big to travel inline: RESOURCE_EXHAUSTED before sending.
  BatchRef big = driver.put("big", {{"x", at::zeros({40000, 3})}});
  EXPECT_THROW(a.call("scale", {big}, Args().set("factor", 1.0)), ResourceExhausted);
  EXPECT_EQ(a.call("scale", {x}, Args().set("factor", 1.0)).get().output.rows, 5);
  EXPECT_TRUE(driver.failure().empty());

  // Requests from a client that is not the driver.
  const ProcessInfo worker = driver.processes().front();
  auto stub = tessera::rlhf::proto::Worker::NewStub(rpc::channel(worker.address, {}));
  auto send = [&](const tessera::rlhf::proto::CallRequest& req) {
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, std::chrono::seconds(10));
    tessera::rlhf::proto::CallReply reply;
    return stub->Call(&ctx, req, &reply);
  };
  tessera::rlhf::proto::CallRequest req;
  req.set_seq(0);
  req.set_role("a");
  req.set_method("scale");
  EXPECT_EQ(send(req).error_code(), grpc::StatusCode::INVALID_ARGUMENT);  // seq 0
  req.set_seq(1000);
  req.set_role("nobody");
  EXPECT_EQ(send(req).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  req.set_role("a");
  req.set_args_json("{not json");
  grpc::Status st = send(req);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  req.set_args_json("{}");
  tessera::rlhf::proto::InputRef* in = req.add_inputs();
  in->set_batch("evil");
  tessera::rlhf::proto::BatchPart* part = in->add_parts();
  part->set_process(-1);
  part->set_rows(2);
  rpc::TensorProto* t = part->add_inline_rows();
  t->set_name("x");
  t->set_dtype("float32");
  t->add_shape(2);
  t->add_shape(3);
  t->set_data(std::string(7, 'x'));  // 24 bytes expected
  st = send(req);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("data bytes"), std::string::npos) << st.error_message();
  t->set_dtype("float99");
  EXPECT_EQ(send(req).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  t->set_dtype("float32");
  t->set_data(std::string(100 << 10, 'x'));  // over the 64 KiB limit
  EXPECT_EQ(send(req).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  // Padding of 2^40 copies of the last row (found by
  // fuzz/rlhf_worker_request_fuzz.cpp: the worker allocated them, 6 GB for
  // a smaller count): refused before anything is allocated.
  t->set_data(std::string(24, 'x'));
  in->set_repeat_last(int64_t{1} << 40);
  st = send(req);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("padding of 1099511627776 rows"), std::string::npos)
      << st.error_message();
  in->set_repeat_last(0);
  // Fetch of rows a worker holds, with a range whose end overflows int64
  // (found by fuzz/rlhf_worker_request_fuzz.cpp: offset + rows overflowed,
  // undefined behaviour): refused, as is a range past the rows held.
  const BatchRef held = a.call("scale", {x}, Args().set("factor", 1.0)).get().output;
  ASSERT_FALSE(held.parts.empty());
  auto fetch = [&](int64_t offset, int64_t rows) {
    auto owner = tessera::rlhf::proto::Worker::NewStub(
        rpc::channel(driver.processes().at(held.parts[0].process).address, {}));
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, std::chrono::seconds(10));
    tessera::rlhf::proto::FetchRequest fr;
    fr.set_batch(held.name);
    fr.set_offset(offset);
    fr.set_rows(rows);
    tessera::rlhf::proto::FetchReply reply;
    return owner->Fetch(&ctx, fr, &reply);
  };
  const int64_t part_rows = held.parts[0].end - held.parts[0].begin;
  EXPECT_TRUE(fetch(held.parts[0].offset, part_rows).ok());
  EXPECT_EQ(fetch(5, std::numeric_limits<int64_t>::max() - 2).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(fetch(0, 1 << 20).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // The workers are unharmed.
  EXPECT_EQ(b.call("scale", {x}, Args().set("factor", 1.0)).get().output.rows, 5);
  driver.shutdown();
  for (const ProcessInfo& p : driver.processes()) EXPECT_FALSE(process_alive(p.pid)) << p.pid;
}

TEST(Runtime, KilledWorkerStopsTheRunNamingRoleAndRank) {
  DriverOptions o;
  o.pools = {{"all", 4}};
  o.roles = {{"a", "math", "all", R"({"tp": 2})"}, {"b", "math", "all", "{}"}};
  // Pool rank 2 dies as its second call of a.scale begins; the others
  // wait in the call's all-reduce for it.
  o.worker_env = {"TESSERA_RLHF_FAULT=a.scale:2:2"};
  std::vector<ProcessInfo> procs;
  auto start = std::chrono::steady_clock::now();
  {
    Driver driver(o);
    procs = driver.processes();
    BatchRef x = driver.put("x", {{"x", rows_tensor(6)}});
    EXPECT_EQ(driver.group("a").call("scale", {x}, Args().set("factor", 1.0)).get().output.rows, 6);
    start = std::chrono::steady_clock::now();
    try {
      driver.group("a").call("scale", {x}, Args().set("factor", 1.0)).get();
      ADD_FAILURE() << "no error";
    } catch (const Unavailable& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("a rank 2"), std::string::npos) << msg;
      EXPECT_NE(msg.find("signal 9"), std::string::npos) << msg;
      EXPECT_NE(msg.find("during a.scale"), std::string::npos) << msg;
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(seconds, 10.0);
    // Later calls fail at once with the same failure.
    EXPECT_THROW(driver.group("b").call("scale", {x}, Args().set("factor", 1.0)), Unavailable);
    EXPECT_THROW(driver.shutdown(), Unavailable);
  }
  for (const ProcessInfo& p : procs) EXPECT_FALSE(process_alive(p.pid)) << "orphan pid " << p.pid;
}

TEST(Runtime, HungCallFailsAtItsDeadline) {
  DriverOptions o;
  o.pools = {{"all", 2}};
  o.roles = {{"a", "math", "all", "{}"}};
  std::vector<ProcessInfo> procs;
  {
    Driver driver(o);
    procs = driver.processes();
    CallOptions co;
    co.timeout = std::chrono::seconds(1);
    const auto start = std::chrono::steady_clock::now();
    try {
      driver.group("a").call("sleep", {}, Args().set("seconds", 60.0), co).get();
      ADD_FAILURE() << "no error";
    } catch (const DeadlineExceeded& e) {
      EXPECT_NE(std::string(e.what()).find("a.sleep on a rank"), std::string::npos) << e.what();
    }
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 8.0);
  }
  for (const ProcessInfo& p : procs) EXPECT_FALSE(process_alive(p.pid)) << "orphan pid " << p.pid;
}

TEST(Runtime, SetupErrorNamesTheRole) {
  DriverOptions o;
  o.pools = {{"all", 2}};
  o.roles = {{"a", "math", "all", R"({"tp": 1, "typo": 3})"}};
  try {
    Driver driver(o);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("typo"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("a rank"), std::string::npos) << e.what();
  }
  o.roles = {{"a", "no_such_type", "all", "{}"}};
  EXPECT_THROW(Driver{o}, Error);
}

}  // namespace
}  // namespace tessera::rlhf

int main(int argc, char** argv) {
  tessera::init_runtime();
  if (auto code = tessera::rlhf::run_worker_if_spawned(tessera::rlhf::test_roles())) return *code;
  ::testing::InitGoogleTest(&argc, argv);
  return tessera::testutil::run_all_tests();
}
