// tessera/reason/scene_vlm.h — a small vision-language model trained here
// on rendered scenes, saved in the SmolVLM (Idefics3) folder layout.
//
// No vision-language weights can be installed on these machines, so the
// vision expert of the ProReason examples is trained from scratch: a
// SigLIP-style ViT over 8 x 8 patches of 64 x 64 scenes, the Idefics3
// pixel-shuffle connector and a small Llama language model, on
// perception questions and captions generated with their ground truth
// (reason/scenes.h). The byte-level BPE tokenizer is learned from the same
// text and written as tokenizer.json, so the folder (config.json,
// model.safetensors, tokenizer.json, tokenizer_config.json,
// preprocessor_config.json) loads with nn::load_vlm_folder exactly as a
// downloaded SmolVLM does.
//
//   tessera::reason::SceneVlmOptions o;
//   o.output_dir = "scene-vlm";
//   auto report = tessera::reason::train_scene_vlm(o);
//   auto vlm = tessera::nn::load_vlm_folder("scene-vlm");
//   auto eval = tessera::reason::evaluate_perception(vlm, 0, 200);
//
// Scene seeds: training draws scenes from seeds >= kTrainSceneSeedBase;
// evaluations and benchmarks use seeds below it, so every evaluation image
// is held out.
//
// Thread safety: functions are thread-compatible (they run LibTorch
// forwards on the models they are given).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "tessera/nn/vlm.h"

namespace tessera::reason {

inline constexpr uint64_t kTrainSceneSeedBase = 1000000;

struct SceneVlmOptions {
  std::string output_dir;  // created; a previous model there is replaced
  uint64_t seed = 0;       // weights and data order
  int64_t steps = 1500;
  int64_t batch = 32;               // scenes per step
  int64_t questions_per_scene = 3;  // turns per training sequence
  double lr = 2e-3;
  double min_lr = 2e-4;
  int64_t warmup = 100;
  // Architecture (defaults: ~0.9M parameters).
  int64_t image_size = 64;
  int64_t patch_size = 8;
  int64_t scale_factor = 2;  // 64 patches -> 16 image tokens
  int64_t vision_hidden = 96;
  int64_t vision_layers = 3;
  int64_t vision_heads = 4;
  int64_t text_hidden = 128;
  int64_t text_layers = 3;
  int64_t text_heads = 4;
  int64_t text_kv_heads = 2;
  int64_t bpe_merges = 250;
  int64_t log_every = 100;  // progress lines on logger "reason" (0: none)
  int threads = 0;          // intra-op threads (0: LibTorch's default)
  // Learning rate of the vision encoder and connector relative to the
  // language model's: a model trained from scratch learns the text priors
  // long before its eyes, and a larger step for the vision side helps.
  double vision_lr_scale = 1.0;
  // Continue training the scene VLM in this folder (its config, tokenizer
  // and weights; the architecture fields above are then ignored). Empty:
  // start from random weights.
  std::string init_from;
};

struct SceneVlmReport {
  int64_t parameters = 0;
  int64_t vocab_size = 0;
  double seconds = 0;
  std::vector<std::pair<int64_t, double>> loss_curve;  // (step, mean loss since the previous point)
};

// Trains and writes the model folder. InvalidArgument for an empty
// output_dir or sizes that do not fit (validation of the VLM config).
SceneVlmReport train_scene_vlm(const SceneVlmOptions& options);

// Writes tokenizer.json / tokenizer_config.json of a byte-level BPE with
// `merges` merges learned from `texts` (GPT-2 pre-tokenization) plus the
// given special tokens (the first is EOS). Returns the vocabulary size.
int64_t write_bpe_tokenizer(const std::string& dir, const std::vector<std::string>& texts,
                            int64_t merges, const std::vector<std::string>& specials);

struct PerceptionEval {
  int64_t questions = 0;
  int64_t correct = 0;
  double accuracy = 0;
  // Always answering the most frequent answer of each question kind in this
  // evaluation set (the honest "chance" of these questions).
  double majority_baseline = 0;
  std::map<std::string, std::pair<int64_t, int64_t>> by_kind;  // kind -> (correct, total)
};

// Greedy answers to `per_scene` perception questions (captions excluded) on
// each held-out scene seed in [first_seed, first_seed + scenes); exact match
// after trimming. InvalidArgument when the seeds reach the training range.
PerceptionEval evaluate_perception(const nn::LoadedVlm& vlm, uint64_t first_seed, int64_t scenes,
                                   int64_t per_scene = 4);

}  // namespace tessera::reason
