// tessera/core/thread_pool.h — a small fixed-size thread pool.
//
// Used for background work (checkpoint I/O, prefetch) where a test must be
// able to control the executor. Tasks run in submission order across the
// workers; an exception thrown by a task is delivered through its future.
//
//   tessera::ThreadPool pool(4);
//   auto f = pool.submit([] { return write_shard(); });
//   f.get();   // rethrows what write_shard threw
//
// Thread-safe. The destructor finishes every queued task, then joins.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace tessera {

class ThreadPool {
 public:
  // `num_threads` must be at least 1 (InvalidArgument otherwise).
  explicit ThreadPool(size_t num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  size_t size() const { return workers_.size(); }

  template <typename Fn>
  [[nodiscard]] std::future<std::invoke_result_t<Fn>> submit(Fn fn) {
    using R = std::invoke_result_t<Fn>;
    auto task = std::make_shared<std::packaged_task<R()>>(std::move(fn));
    std::future<R> result = task->get_future();
    enqueue([task] { (*task)(); });
    return result;
  }

  // Blocks until the queue is empty and no task is running.
  void wait_idle();

 private:
  void enqueue(std::function<void()> job);
  void worker_loop();

  std::mutex mu_;
  std::condition_variable work_ready_;
  std::condition_variable idle_;
  std::deque<std::function<void()>> queue_;  // guarded by mu_
  size_t running_ = 0;                       // guarded by mu_
  bool stopping_ = false;                    // guarded by mu_
  std::vector<std::thread> workers_;
};

}  // namespace tessera
