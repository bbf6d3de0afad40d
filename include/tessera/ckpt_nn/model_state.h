// tessera/ckpt_nn/model_state.h — checkpoints of nn::Transformer models and
// their optimizer state, Hugging Face export/import, offline resharding.
//
// A training job's ranks form a (dp, replica) mesh: replica = the tp x ep
// ranks of one model copy (numbered by Transformer::replica_rank()), dp
// copies of it. Checkpoint rank = dp_rank * replica_size + replica_rank.
// Parameters are replicated over dp; ZeRO-1 optimizer state is a flat slice
// of the concatenation of each replica rank's local parameters (as
// nn::AdamW keeps it), split evenly over dp — saved per parameter as
// irregular flat boxes, so it reloads at any tp, ep or dp.
//
//   ckpt::ModelState ms{dp_rank, dp_size};
//   ckpt::State state;
//   ckpt::add_trainer(state, trainer, ms);      // parameters, AdamW state, step
//   state.data_position = samples_seen;
//   checkpointer.save(ckpt::step_dir(root, step), state, world);
//
//   // Resuming, at any tp / dp / ZeRO setting:
//   ckpt::State want;
//   ckpt::add_trainer(want, trainer, ms);
//   ckpt::LoadResult r = checkpointer.load(*ckpt::latest(root), want, world);
//   ckpt::restore_trainer(want, trainer, ms, r);  // step counts, ZeRO master
//
// Every tensor carries attrs ("role", "split", "expert") and the state the
// model config (user["tessera.model_config"]), so tools can rebuild layouts
// for other parallel degrees without the training code.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tessera/ckpt/checkpoint.h"
#include "tessera/formats/model_config.h"
#include "tessera/nn/model.h"
#include "tessera/nn/parameters.h"
#include "tessera/nn/train.h"

namespace tessera::ckpt {

// Where this rank sits in the (dp, replica) world.
struct ModelState {
  int dp_rank = 0;
  int dp_size = 1;
};

// `replica` replicated over dp copies: world rank = dp_rank * R + r.
dist::Layout over_dp(const dist::Layout& replica, int dp_size);

// ZeRO-1 layouts: replica rank r's local parameters (names in order, those
// it holds) are concatenated, padded to a multiple of dp_size and split
// evenly over the dp ranks; each parameter's share on each world rank is a
// flat range of its local shard. `replica_layouts` in model parameter order.
std::map<std::string, dist::Layout> zero1_layouts(
    const std::vector<std::pair<std::string, dist::Layout>>& replica_layouts, int dp_size);

// Adds every parameter of the full model (an empty tensor for experts this
// rank does not hold) in its (dp, replica) layout, with attrs role=param,
// split, expert; sets user["tessera.model_config"], "tessera.tp", "tessera.ep",
// "tessera.dp". The local tensors alias the model's (no copy).
void add_model(State& state, const nn::Transformer& model, const ModelState& where);

// Adds optimizer state kept ZeRO-1 style: each value of `flat` is this
// rank's [shard] slice of the padded concatenation of the model's local
// parameters (model.named_parameters() order), e.g. AdamW's exp_avg. Saved
// per parameter as "optim.<key>/<param>" with attrs role=optim, zero1=1.
// InvalidArgument when a slice has the wrong size.
void add_zero1_optimizer(State& state, const nn::Transformer& model, const ModelState& where,
                         const std::map<std::string, at::Tensor>& flat);

// Adds per-parameter optimizer state (plain, non-ZeRO AdamW): per key, one
// tensor per model.named_parameters() entry, shaped like it.
void add_optimizer(State& state, const nn::Transformer& model, const ModelState& where,
                   const std::map<std::string, std::vector<at::Tensor>>& per_param);

// Adds `optimizer`'s live state (nn::AdamW::state_tensors: aliases, so a
// load restores the optimizer in place, and a State built once can be saved
// again after more steps). The optimizer must have been built over
// model.named_parameters() in that order (as nn::Trainer does).
//   ZeRO-1 (optimizer.zero1()): exp_avg and exp_avg_sq as
//     add_zero1_optimizer; `where.dp_size` must be the ZeRO group's size.
//     The float32 master slice is added as "master" only when some
//     parameter is not float32: otherwise it equals the parameters bit for
//     bit and restore_trainer / restore_master rebuild it from them.
//   plain: exp_avg and exp_avg_sq per parameter, as add_optimizer.
// Either loads into the other, at any tp, ep or dp. InvalidArgument when
// the optimizer's state does not match the model's parameters (e.g. an
// nn::Trainer over adapter parameters: not supported here).
void add_optimizer(State& state, const nn::Transformer& model, const ModelState& where,
                   nn::AdamW& optimizer);

// Everything needed to resume training with `trainer` (built over the whole
// model, not over adapter parameters): add_model,
// add_optimizer(trainer.optimizer()) and state.step = trainer.steps(). The
// caller sets state.data_position (and updates step and data_position
// before each later save of the same State).
void add_trainer(State& state, nn::Trainer& trainer, const ModelState& where);

// After Checkpointer::load into a State built by add_trainer: sets the
// trainer's and its optimizer's step count to state.step, and rebuilds the
// ZeRO-1 master slice from the loaded parameters unless the state held the
// master and `loaded` does not list it as missing. Local; not collective.
void restore_trainer(const State& state, nn::Trainer& trainer, const ModelState& where,
                     const LoadResult& loaded = {});

// Rebuilds a ZeRO-1 optimizer's master slice from the model's current
// parameters (rank where.dp_rank's slice of their float32 concatenation).
// No-op for a plain optimizer. InvalidArgument when the slice size does not
// match `where`.
void restore_master(const nn::Transformer& model, const ModelState& where, nn::AdamW& optimizer);

// Writes the model parameters of checkpoint `dir` as a Hugging Face folder
// (config.json + safetensors) at `out`; one process, one full tensor at a
// time is assembled. NotFound when the checkpoint has no model config.
void export_hf(const std::string& dir, const std::string& out,
               int64_t max_shard_bytes = int64_t{5} << 30);

// Fills every entry of `state` whose name the Hugging Face folder `hf_dir`
// has (this rank's part of each, read through the memory map, so only the
// needed pages are touched). Returns the names filled.
std::vector<std::string> import_hf(const std::string& hf_dir, State& state, int rank);

// Rewrites checkpoint `dir` (saved with add_model / add_*optimizer) at `out`
// for tp x ep x dp ranks, in one process: the target ranks run as threads,
// each loading its part and saving it. Memory: the whole state once.
void reshard(const std::string& dir, const std::string& out, int tp, int dp, int ep = 1);

}  // namespace tessera::ckpt
