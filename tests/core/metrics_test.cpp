#include "tessera/core/metrics.h"

#include <gtest/gtest.h>

#include <thread>

#include "tessera/core/error.h"
#include "tessera/core/thread_pool.h"

namespace tessera {
namespace {

TEST(Metrics, PrometheusText) {
  MetricsRegistry reg;
  reg.counter("tessera_steps_total", "Steps taken").increment(3);
  reg.gauge("tessera_loss", "Current loss").set(2.5);
  auto& h = reg.histogram("tessera_step_seconds", "Step time", {0.1, 1.0});
  h.observe(0.05);
  h.observe(0.5);
  h.observe(5.0);
  EXPECT_EQ(reg.to_prometheus(),
            "# HELP tessera_loss Current loss\n"
            "# TYPE tessera_loss gauge\n"
            "tessera_loss 2.5\n"
            "# HELP tessera_step_seconds Step time\n"
            "# TYPE tessera_step_seconds histogram\n"
            "tessera_step_seconds_bucket{le=\"0.10000000000000001\"} 1\n"
            "tessera_step_seconds_bucket{le=\"1\"} 2\n"
            "tessera_step_seconds_bucket{le=\"+Inf\"} 3\n"
            "tessera_step_seconds_sum 5.5499999999999998\n"
            "tessera_step_seconds_count 3\n"
            "# HELP tessera_steps_total Steps taken\n"
            "# TYPE tessera_steps_total counter\n"
            "tessera_steps_total 3\n");
}

TEST(Metrics, SameNameSameMetricOtherKindRejected) {
  MetricsRegistry reg;
  auto& a = reg.counter("c", "");
  auto& b = reg.counter("c", "");
  EXPECT_EQ(&a, &b);
  EXPECT_THROW(reg.gauge("c", ""), InvalidArgument);
  EXPECT_THROW(reg.counter("9bad", ""), InvalidArgument);
  EXPECT_THROW(a.increment(-1), InvalidArgument);
}

TEST(Metrics, LabelledSeriesShareOneHelpAndType) {
  MetricsRegistry reg;
  auto& stop = reg.counter("vllm:request_success_total", "Finished requests",
                           {{"model_name", "m"}, {"finished_reason", "stop"}});
  auto& length = reg.counter("vllm:request_success_total", "Finished requests",
                             {{"model_name", "m"}, {"finished_reason", "length"}});
  EXPECT_NE(&stop, &length);
  EXPECT_EQ(&stop, &reg.counter("vllm:request_success_total", "",
                                {{"model_name", "m"}, {"finished_reason", "stop"}}));
  stop.increment(2);
  length.increment();
  reg.gauge("g", "A gauge", {{"model_name", "a \"quoted\"\\ name\n"}}).set(1);
  auto& h = reg.histogram("lat_seconds", "Latency", {1.0}, {{"model_name", "m"}});
  h.observe(0.5);
  h.observe(2);
  EXPECT_EQ(reg.to_prometheus(),
            "# HELP g A gauge\n"
            "# TYPE g gauge\n"
            "g{model_name=\"a \\\"quoted\\\"\\\\ name\\n\"} 1\n"
            "# HELP lat_seconds Latency\n"
            "# TYPE lat_seconds histogram\n"
            "lat_seconds_bucket{model_name=\"m\",le=\"1\"} 1\n"
            "lat_seconds_bucket{model_name=\"m\",le=\"+Inf\"} 2\n"
            "lat_seconds_sum{model_name=\"m\"} 2.5\n"
            "lat_seconds_count{model_name=\"m\"} 2\n"
            "# HELP vllm:request_success_total Finished requests\n"
            "# TYPE vllm:request_success_total counter\n"
            "vllm:request_success_total{model_name=\"m\",finished_reason=\"length\"} 1\n"
            "vllm:request_success_total{model_name=\"m\",finished_reason=\"stop\"} 2\n");
  EXPECT_THROW(reg.counter("c", "", {{"9bad", "x"}}), InvalidArgument);
  EXPECT_THROW(reg.counter("c", "", {{"__reserved", "x"}}), InvalidArgument);
  EXPECT_THROW(reg.histogram("h", "", {1.0}, {{"le", "x"}}), InvalidArgument);
  EXPECT_THROW(reg.gauge("vllm:request_success_total", "", {{"model_name", "m"}}), InvalidArgument);
}

TEST(Metrics, CounterIsThreadSafe) {
  MetricsRegistry reg;
  auto& c = reg.counter("hits", "");
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) c.increment();
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(c.value(), 40000);
}

TEST(ThreadPool, RunsTasksAndPropagatesExceptions) {
  ThreadPool pool(3);
  std::vector<std::future<int>> results;
  for (int i = 0; i < 50; ++i) results.push_back(pool.submit([i] { return i * i; }));
  for (int i = 0; i < 50; ++i) EXPECT_EQ(results[i].get(), i * i);
  auto bad = pool.submit([]() -> int { TESSERA_THROW(DataLoss, "disk"); });
  EXPECT_THROW(bad.get(), DataLoss);
  std::atomic<int> n{0};
  for (int i = 0; i < 20; ++i) (void)pool.submit([&] { n++; });
  pool.wait_idle();
  EXPECT_EQ(n.load(), 20);
  EXPECT_THROW(ThreadPool(0), InvalidArgument);
}

TEST(Stopwatch, Measures) {
  Stopwatch w;
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_GE(w.milliseconds(), 19.0);
}

}  // namespace
}  // namespace tessera
