// tessera-serve: an OpenAI-compatible server for one model (continuous
// batching over a paged KV cache; include/tessera/serve/engine.h and
// http_server.h say what it does).
//
//   tessera-serve --model $(scripts/smollm2-path.sh)                  # 127.0.0.1:8000
//   tessera-serve --model hf_folder/ --quant w4a16 --port 8080 --api-key secret
//                 --adapters math=adapters/math --max-num-seqs 32   (one command line)
//
// With --grpc-port, the streaming gRPC Generation service
// (tessera/serve/grpc.h) listens too, on the same host and engine.
//
// SIGTERM or SIGINT drains: new requests get 503 (gRPC: FAILED_PRECONDITION),
// running ones finish for up to --drain-seconds (the rest are aborted),
// then the server exits 0.
//
// --tp N serves the model tensor-parallel over N processes on this host:
// tessera-serve starts them itself through the launcher (or runs as one of
// them under tessera-launch --nproc N). Rank 0 serves HTTP and schedules;
// the others hold their shards and follow its steps, ignoring SIGTERM until
// rank 0 has drained and lets them go.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <thread>

#include "command_line.h"
#include "tessera/core/error.h"
#include "tessera/core/runtime.h"
#include "tessera/dist/launcher.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/serve/engine.h"
#include "tessera/serve/http_server.h"
#ifdef TESSERA_SERVE_GRPC
#include "tessera/serve/grpc.h"
#endif

int main(int argc, char** argv) {
  tessera::serve::EngineOptions eo;
  tessera::serve::HttpServerOptions ho;
  std::vector<std::string> adapters;
  int64_t kv_memory_mib = 0;
  double drain_seconds = 30;
  bool no_prefix_caching = false;
  int grpc_port = -1;
  int tp = 1;
  CLI::App app{
      "An OpenAI-compatible server (completions, chat, streaming, adapters, metrics) for one "
      "model.",
      "tessera-serve"};
  app.option_defaults()->always_capture_default();
  app.add_option("--model", eo.model,
                 "GGUF file, Hugging Face folder (vision-language: idefics3 / smolvlm / llava), "
                 "or packed int4 .safetensors")
      ->required();
  app.add_option("--tokenizer", eo.tokenizer, "tokenizer.json for a folder without one");
  app.add_option("--served-model-name", eo.model_name,
                 "name in /v1/models and metrics (default: the file name)");
  app.add_option("--quant", eo.quantization,
                 "fp, w4a16 (packed int4) or qspec (W4A4 draft, W4A16 verify)")
      ->check(CLI::IsMember({"fp", "w4a16", "qspec"}));
  app.add_option("--adapters", adapters, "LoRA / MoS adapters a request may name: NAME=FOLDER ...");
  app.add_option("--host", ho.host, "address to listen on (loopback unless told otherwise)");
  app.add_option("--port", ho.port, "port (0: a free one, printed)")->check(CLI::Range(0, 65535));
  app.add_option("--api-key", ho.api_key, "require Authorization: Bearer KEY (default: none)");
#ifdef TESSERA_SERVE_GRPC
  app.add_option("--grpc-port", grpc_port,
                 "also serve the gRPC Generation service on this port (0: a free one, printed; "
                 "-1: off)")
      ->check(CLI::Range(-1, 65535));
#endif
  app.add_option("--tp", tp,
                 "tensor-parallel processes on this host (fp weights, text models, no adapters; "
                 "the model's kv heads must split over them)")
      ->check(CLI::Range(1, 256));
  app.add_option("--max-num-seqs", eo.max_num_seqs, "sequences decoding at once")
      ->check(tessera::examples::positive());
  app.add_option("--max-batched-tokens", eo.max_num_batched_tokens,
                 "tokens per model step (chunked prefill)")
      ->check(tessera::examples::positive());
  app.add_option("--block-size", eo.block_size, "KV cache block size in tokens")
      ->check(tessera::examples::positive());
  app.add_option("--kv-blocks", eo.num_blocks, "KV cache blocks (0: from --kv-memory)");
  app.add_option("--kv-memory", kv_memory_mib, "KV cache size in MiB (0 with --kv-blocks 0: 512)");
  app.add_option("--max-model-len", eo.max_model_len,
                 "longest prompt + generation (0: the model's)");
  app.add_flag("--no-prefix-caching", no_prefix_caching, "do not reuse cached prompt blocks");
  app.add_option("--chat-template", eo.chat_template, "a ChatML template (default: the model's)");
  app.add_option("--threads", eo.num_threads,
                 "intra-op threads for the model (0: all usable cores)");
  app.add_option("--http-threads", ho.threads, "connections served at once (each stream holds one)")
      ->check(CLI::Range(2, 4096));
  app.add_option("--max-concurrent-requests", ho.max_concurrent_requests,
                 "requests in flight (503 beyond)")
      ->check(tessera::examples::positive());
  app.add_option("--max-request-bytes", ho.max_request_bytes, "largest request body (413 beyond)")
      ->check(CLI::Range(int64_t{1024}, int64_t{1} << 34));
  app.add_flag("--enable-adapter-loading", ho.enable_adapter_loading,
               "serve /v1/load_lora_adapter and /v1/unload_lora_adapter");
  app.add_option("--adapter-root", ho.adapter_root,
                 "folder that runtime-loaded adapters must lie under");
  app.add_option("--allowed-local-media-path", ho.allowed_local_media_path,
                 "chat image parts may name local files under this folder (default: only data: "
                 "URLs)");
  app.add_option("--max-images-per-request", eo.max_images_per_request,
                 "images one chat request may carry (vision-language models)")
      ->check(CLI::Range(int64_t{0}, int64_t{1024}));
  app.add_option("--drain-seconds", drain_seconds,
                 "on SIGTERM, how long running requests may finish");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  eo.kv_memory_bytes = kv_memory_mib << 20;
  eo.enable_prefix_caching = !no_prefix_caching;
  for (const auto& a : adapters) {
    const auto eq = a.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == a.size()) {
      std::cerr << "tessera-serve: --adapters expects NAME=FOLDER, got '" << a << "'\n";
      return 2;
    }
    eo.adapters[a.substr(0, eq)] = a.substr(eq + 1);
  }

  std::optional<tessera::dist::EnvInfo> env;
  try {
    env = tessera::dist::EnvInfo::from_env();
    if (tp > 1 && !env->distributed) {
      // Start the ranks: this program again, tp times, under the launcher
      // (which forwards SIGTERM and stops every rank when one fails). Rank
      // 0 needs up to --drain-seconds after SIGTERM.
      tessera::dist::LaunchOptions lo;
      lo.nproc = tp;
      lo.prefix_output = false;
      lo.signal_ends_successfully = true;
      lo.grace = std::chrono::milliseconds(static_cast<int64_t>(drain_seconds * 1000) + 15000);
      char self[4096];
      const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
      lo.command.push_back(n > 0 ? std::string(self, static_cast<size_t>(n)) : argv[0]);
      for (int i = 1; i < argc; ++i) lo.command.emplace_back(argv[i]);
      return tessera::dist::launch(lo, std::cerr);
    }
    if (env->distributed && env->world_size != tp) {
      std::cerr << "tessera-serve: --tp " << tp << " but the launcher started " << env->world_size
                << " ranks\n";
      return 2;
    }
  } catch (const tessera::Error& e) {
    std::cerr << "tessera-serve: " << e.what() << "\n";
    return 1;
  }

  // SIGTERM / SIGINT are taken by a waiting thread, not a handler: block
  // them before any thread starts (every thread inherits the mask).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  try {
    tessera::RuntimeOptions ro;
    ro.num_threads = eo.num_threads;
    const tessera::RuntimeInfo info = tessera::init_runtime(ro);
    if (tp > 1) {
      // An idle server sends no steps for as long as no request comes: the
      // group may wait for days (a rank that dies closes its connections,
      // which the others see at once).
      tessera::dist::InitOptions io;
      io.group.name = "tp";
      io.group.timeout = std::chrono::hours(24 * 365);
      eo.tensor_parallel = tessera::dist::init_process_group(io);
      if (eo.tensor_parallel->rank() != 0) {
        // SIGTERM stays blocked: rank 0 drains, then releases this rank.
        tessera::serve::Engine::run_tensor_parallel_rank(eo);
        return 0;
      }
    }
    std::cerr << "tessera-serve: " << info.summary() << "\n";
    auto engine = tessera::serve::Engine::create(eo);
    auto server = tessera::serve::HttpServer::start(*engine, ho);
    std::cout << "tessera-serve: " << engine->model_name() << " on " << server->url() << std::endl;
#ifdef TESSERA_SERVE_GRPC
    std::unique_ptr<tessera::serve::GrpcServer> grpc_server;
    if (grpc_port >= 0) {
      tessera::serve::GrpcServerOptions go;
      go.host = ho.host;
      go.port = grpc_port;
      go.api_key = ho.api_key;
      go.max_concurrent_requests = ho.max_concurrent_requests;
      grpc_server = tessera::serve::GrpcServer::start(*engine, go);
      std::cout << "tessera-serve: gRPC Generation service on " << grpc_server->address()
                << std::endl;
    }
#else
    (void)grpc_port;
#endif
    std::thread waiter([&] {
      int sig = 0;
      sigwait(&signals, &sig);
      std::cerr << "tessera-serve: signal " << sig << ", draining for up to " << drain_seconds
                << " s\n";
      const bool all =
          server->drain(std::chrono::milliseconds(static_cast<int64_t>(drain_seconds * 1000)));
      std::cerr << "tessera-serve: "
                << (all ? "every request finished" : "requests past the deadline were aborted")
                << "; stopped\n";
    });
    server->wait();
    waiter.join();
#ifdef TESSERA_SERVE_GRPC
    // The engine has drained: calls still open get their last events now.
    if (grpc_server) grpc_server->shutdown(std::chrono::seconds(1));
#endif
    return 0;
  } catch (const tessera::Error& e) {
    std::cerr << "tessera-serve: " << e.what() << "\n";
    return 1;
  }
}
