#include "tessera/specdec/qspec.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <limits>

#include "tessera/core/error.h"
#include "tessera/core/metrics.h"

namespace tessera::specdec {

at::Tensor sampling_probs(const at::Tensor& logits, const nn::SamplingOptions& options) {
  TESSERA_CHECK(logits.dim() == 2, InvalidArgument, "sampling_probs: logits must be [N, vocab]");
  TESSERA_CHECK(options.temperature > 0, InvalidArgument,
                "sampling_probs: temperature must be > 0 (greedy has no distribution)");
  at::Tensor scaled = logits.to(at::kFloat) / options.temperature;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (options.top_k > 0 && options.top_k < scaled.size(-1)) {
    at::Tensor kth = std::get<0>(scaled.topk(options.top_k, -1)).narrow(-1, options.top_k - 1, 1);
    scaled = scaled.masked_fill(scaled < kth, neg_inf);
  }
  if (options.top_p < 1.0) {
    auto [sorted, idx] = scaled.sort(-1, /*descending=*/true);
    at::Tensor p = at::softmax(sorted, -1);
    at::Tensor drop = (p.cumsum(-1) - p) > options.top_p;
    sorted = sorted.masked_fill(drop, neg_inf);
    scaled = at::empty_like(scaled).scatter_(-1, idx, sorted);
  }
  return at::softmax(scaled, -1);
}

Acceptance accept_greedy(const at::Tensor& verifier_logits, const std::vector<int64_t>& draft) {
  const int64_t gamma = static_cast<int64_t>(draft.size());
  TESSERA_CHECK(verifier_logits.dim() == 2 && verifier_logits.size(0) == gamma + 1, InvalidArgument,
                "accept_greedy: expected logits [", gamma + 1, ", vocab]");
  at::Tensor best = verifier_logits.argmax(-1);
  auto b = best.accessor<int64_t, 1>();
  Acceptance a;
  while (a.accepted < gamma && b[a.accepted] == draft[a.accepted]) ++a.accepted;
  a.next_token = b[a.accepted];
  return a;
}

namespace {
double uniform(at::Generator& gen) {
  return at::rand({1}, gen, at::TensorOptions().dtype(at::kDouble)).item<double>();
}
int64_t sample_from(const at::Tensor& probs, at::Generator& gen) {
  return at::multinomial(probs.view({1, -1}), 1, false, gen).item<int64_t>();
}
}  // namespace

Acceptance accept_sampled(const at::Tensor& p, const at::Tensor& q,
                          const std::vector<int64_t>& draft, at::Generator& generator) {
  const int64_t gamma = static_cast<int64_t>(draft.size());
  TESSERA_CHECK(p.dim() == 2 && p.size(0) == gamma + 1 && q.dim() == 2 && q.size(0) == gamma &&
                    (gamma == 0 || q.size(1) == p.size(1)),
                InvalidArgument, "accept_sampled: expected p [", gamma + 1, ", V] and q [", gamma,
                ", V]");
  at::Tensor pf = p.to(at::kDouble), qf = q.to(at::kDouble);
  auto pa = pf.accessor<double, 2>();
  auto qa = qf.accessor<double, 2>();
  Acceptance a;
  for (int64_t i = 0; i < gamma; ++i) {
    const int64_t t = draft[i];
    const double pi = pa[i][t], qi = qa[i][t];
    // qi > 0: the draft token was sampled from q.
    if (qi > 0 && uniform(generator) * qi <= pi) {
      ++a.accepted;
      continue;
    }
    at::Tensor residual = (pf[i] - qf[i]).clamp_min(0);
    const double mass = residual.sum().item<double>();
    a.next_token = sample_from(mass > 0 ? residual / mass : pf[i], generator);
    return a;
  }
  a.next_token = sample_from(pf[gamma], generator);
  return a;
}

namespace {

// Chooses gamma step by step from measured throughput (tokens emitted per
// second of draft + verify, summed over the steps run with each value):
// min_gamma first, untried neighbours of the best so far next, then the
// best, with a neighbour tried after `explore_every` steps; an exploration
// that does not change the best doubles that wait (up to 32x), so a
// settled choice costs little. Fixed gamma when !adaptive_gamma.
class GammaController {
 public:
  explicit GammaController(const QSpecOptions& o)
      : o_(o),
        gamma_(o.gamma),
        tokens_at_(o.max_gamma + 1, 0.0),
        seconds_at_(o.max_gamma + 1, 0.0),
        rate_(o.max_gamma + 1, -1.0),
        explore_interval_(o.explore_every),
        best_before_(o.gamma) {}

  int64_t gamma() const { return gamma_; }

  // A step ran with gamma() and emitted `tokens` in `seconds`.
  void observe(double tokens, double seconds) {
    // The first step also pays one-time costs (first touch of the cache and
    // of scratch buffers): it is not a measurement.
    if (!o_.adaptive_gamma || ++steps_ == 1) return;
    tokens_at_[gamma_] += tokens;
    seconds_at_[gamma_] += std::max(seconds, 1e-9);
    rate_[gamma_] = tokens_at_[gamma_] / seconds_at_[gamma_];
    int64_t best = gamma_;
    for (int64_t g = o_.min_gamma; g <= o_.max_gamma; ++g) {
      if (rate_[g] > rate_[best]) best = g;
    }
    if (exploring_) {
      explore_interval_ = best == best_before_
                              ? std::min(explore_interval_ * 2, o_.explore_every * 32)
                              : o_.explore_every;
      exploring_ = false;
    }
    best_before_ = best;
    ++since_explore_;
    gamma_ = best;
    // The smallest gamma first (with min_gamma 0: plain decoding, the
    // baseline), then untried neighbours of the best (a short walk towards
    // the better side), then now and then a neighbour, alternating sides.
    const bool below = best - 1 >= o_.min_gamma && rate_[best - 1] < 0;
    const bool above = best + 1 <= o_.max_gamma && rate_[best + 1] < 0;
    if (rate_[o_.min_gamma] < 0) {
      gamma_ = o_.min_gamma;
    } else if (below || above) {
      gamma_ = below ? best - 1 : best + 1;
    } else if (since_explore_ >= explore_interval_) {
      since_explore_ = 0;
      exploring_ = true;
      int64_t next = best + (explore_up_ ? 1 : -1);
      if (next < o_.min_gamma || next > o_.max_gamma) next = best + (explore_up_ ? -1 : 1);
      if (next >= o_.min_gamma && next <= o_.max_gamma) gamma_ = next;
      explore_up_ = !explore_up_;
    }
  }

 private:
  const QSpecOptions& o_;
  int64_t gamma_;
  std::vector<double> tokens_at_, seconds_at_;
  std::vector<double> rate_;  // tokens per second per gamma; < 0: untried
  int64_t explore_interval_, best_before_;
  int64_t since_explore_ = 0, steps_ = 0;
  bool explore_up_ = true, exploring_ = false;
};

void check_options(const nn::Transformer& model, const quant::QuantizedModel& packed,
                   const GenerateOptions& options) {
  const QSpecOptions& qo = options.qspec;
  TESSERA_CHECK(options.sampling.max_new_tokens >= 0, InvalidArgument,
                "specdec::generate: max_new_tokens < 0");
  const bool uses_packed = options.speculative || options.mode != quant::Mode::kFloat;
  TESSERA_CHECK(!uses_packed || model.linear_override().get() == &packed, InvalidArgument,
                "specdec::generate: install the packed weights first (model.set_linear_override)");
  if (!options.speculative) return;
  TESSERA_CHECK(qo.min_gamma >= 0 && qo.min_gamma <= qo.max_gamma && qo.gamma >= qo.min_gamma &&
                    qo.gamma <= qo.max_gamma && (qo.gamma >= 1 || qo.adaptive_gamma),
                InvalidArgument,
                "specdec::generate: need 0 <= min_gamma <= gamma <= max_gamma and gamma >= 1 "
                "unless adaptive (got ",
                qo.min_gamma, " <= ", qo.gamma, " <= ", qo.max_gamma, ")");
  TESSERA_CHECK(!qo.adaptive_gamma || qo.explore_every >= 2, InvalidArgument,
                "specdec::generate: explore_every must be >= 2");
  TESSERA_CHECK(qo.draft_mode != quant::Mode::kFloat && qo.verify_mode != quant::Mode::kFloat,
                InvalidArgument, "specdec::generate: draft and verify modes must be packed modes");
}

// Per-sequence bookkeeping of one generate() call: emitted tokens, stops,
// lengths.
class Emitter {
 public:
  Emitter(GenerationResult& result, const nn::SamplingOptions& so, int64_t batch)
      : result_(result), so_(so), done_(batch, so.max_new_tokens == 0) {
    result_.tokens.assign(batch, {});
    result_.finish_reason.assign(batch, "length");
  }
  // Appends one token to sequence b; false once the sequence is finished.
  bool emit(int64_t b, int64_t token) {
    if (done_[b]) return false;
    result_.tokens[b].push_back(token);
    ++result_.new_tokens;
    if (std::find(so_.stop_tokens.begin(), so_.stop_tokens.end(), token) != so_.stop_tokens.end()) {
      done_[b] = true;
      result_.finish_reason[b] = "stop";
    } else if (static_cast<int64_t>(result_.tokens[b].size()) >= so_.max_new_tokens) {
      done_[b] = true;
    }
    return !done_[b];
  }
  bool done(int64_t b) const { return done_[b]; }
  bool all_done() const {
    return std::all_of(done_.begin(), done_.end(), [](bool d) { return d; });
  }

 private:
  GenerationResult& result_;
  const nn::SamplingOptions& so_;
  std::vector<bool> done_;
};

// Gamma tokens per sequence drafted autoregressively in the draft mode from
// the pending tokens, with their sampling distributions (sampling only).
struct Drafts {
  std::vector<std::vector<int64_t>> tokens;  // [B][gamma]
  std::vector<at::Tensor> probs;             // per position [B, V]; empty when greedy
};

Drafts draft_tokens(nn::Transformer& model, quant::QuantizedModel& packed,
                    const GenerateOptions& options, const std::vector<int64_t>& pending,
                    int64_t gamma, nn::ForwardOptions& fwd, at::Generator& gen) {
  const int64_t B = static_cast<int64_t>(pending.size());
  const bool greedy = options.sampling.temperature <= 0;
  Drafts d;
  d.tokens.assign(B, {});
  quant::ScopedMode draft_mode(packed, options.qspec.draft_mode);
  fwd.lengths = at::ones({B}, at::kLong);
  std::vector<int64_t> cur = pending;
  for (int64_t i = 0; i < gamma; ++i) {
    at::Tensor logits =
        model.forward(at::tensor(cur, at::kLong).view({B, 1}), fwd).logits.select(1, 0);
    at::Tensor next;
    if (greedy) {
      next = logits.argmax(-1);
    } else {
      at::Tensor q = sampling_probs(logits, options.sampling);
      d.probs.push_back(q);
      next = at::multinomial(q, 1, false, gen).squeeze(-1);
    }
    auto n = next.accessor<int64_t, 1>();
    for (int64_t b = 0; b < B; ++b) {
      d.tokens[b].push_back(n[b]);
      cur[b] = n[b];
    }
  }
  return d;
}

// The verify forward over [pending, drafts...] in the verify mode (the
// packed model's current mode); it overwrites the drafted positions' keys
// and values. Returns logits [B, gamma + 1, V].
at::Tensor verify_logits(nn::Transformer& model, const std::vector<int64_t>& pending,
                         const Drafts& drafts, int64_t gamma, nn::ForwardOptions& fwd) {
  const int64_t B = static_cast<int64_t>(pending.size());
  at::Tensor block = at::empty({B, gamma + 1}, at::kLong);
  for (int64_t b = 0; b < B; ++b) {
    block[b][0] = pending[b];
    for (int64_t i = 0; i < gamma; ++i) block[b][i + 1] = drafts.tokens[b][i];
  }
  fwd.lengths = at::full({B}, gamma + 1, at::kLong);
  return model.forward(block, fwd).logits;
}

GenerationResult plain_decoding(nn::Transformer& model, quant::QuantizedModel& packed,
                                const std::vector<std::vector<int64_t>>& prompts,
                                const GenerateOptions& options,
                                std::unique_ptr<nn::KVCache>* cache_out) {
  quant::ScopedMode scoped(packed, options.mode);
  nn::SamplingOptions so = options.sampling;
  so.batch_invariant = true;
  GenerationResult result;
  static_cast<nn::GenerationResult&>(result) = nn::generate(model, prompts, so, cache_out);
  return result;
}

GenerationResult qspec_decoding(nn::Transformer& model, quant::QuantizedModel& packed,
                                const std::vector<std::vector<int64_t>>& prompts,
                                const GenerateOptions& options,
                                std::unique_ptr<nn::KVCache>* cache_out) {
  const nn::SamplingOptions& so = options.sampling;
  const QSpecOptions& qo = options.qspec;
  const nn::PaddedPrompts padded = nn::pad_prompts(prompts);
  at::NoGradGuard no_grad;
  quant::ScopedMode scoped(packed, qo.verify_mode);

  const int64_t B = static_cast<int64_t>(prompts.size());
  auto gen = at::make_generator<at::CPUGeneratorImpl>(so.seed);
  const bool greedy = so.temperature <= 0;
  GenerationResult result;
  Emitter out(result, so, B);
  auto cache = std::make_unique<nn::KVCache>(
      model.config(), B,
      padded.longest + std::max<int64_t>(so.max_new_tokens, 1) + qo.max_gamma + 1,
      at::TensorOptions().dtype(at::kFloat));
  result.cache_bytes = cache->bytes();

  // Prefill in the verify mode: right-padded prompts.
  Stopwatch watch;
  nn::ForwardOptions fwd;
  fwd.cache = cache.get();
  fwd.batch_invariant = true;
  fwd.lengths = padded.lengths;
  fwd.last_logits_only = true;
  at::Tensor prefill = model.forward(padded.ids, fwd).logits.select(1, 0);
  at::Tensor first = greedy ? prefill.argmax(-1) : nn::sample_next(prefill, so, gen);
  std::vector<int64_t> pending(B, 0);  // the last emitted token, not yet in the cache
  auto f = first.accessor<int64_t, 1>();
  for (int64_t b = 0; b < B; ++b) {
    pending[b] = f[b];
    out.emit(b, f[b]);
  }
  result.prefill_seconds = watch.seconds();
  watch.reset();
  fwd.last_logits_only = false;

  GammaController control(qo);
  SpecStats& st = result.stats;
  st.steps_per_gamma.assign(qo.max_gamma + 1, 0);
  while (!out.all_done()) {
    Stopwatch step_watch;
    const int64_t gamma = control.gamma();
    ++st.steps_per_gamma[gamma];
    // Cache lengths before the step: every kept entry is the verifier's.
    at::Tensor base = cache->lengths().clone();
    Stopwatch draft_watch;
    const Drafts drafts = draft_tokens(model, packed, options, pending, gamma, fwd, gen);
    st.draft_seconds += draft_watch.seconds();

    Stopwatch verify_watch;
    cache->set_lengths(base);  // roll back past the drafts
    at::Tensor vlogits = verify_logits(model, pending, drafts, gamma, fwd);
    at::Tensor vprobs, qprobs;  // [B, gamma + 1, V], [B, gamma, V] (sampling only)
    if (!greedy) {
      vprobs = sampling_probs(vlogits.reshape({B * (gamma + 1), -1}), so).view({B, gamma + 1, -1});
      qprobs = gamma == 0 ? at::empty({B, 0, vprobs.size(2)}, vprobs.options())
                          : at::stack(drafts.probs, 1);
    }
    st.verify_seconds += verify_watch.seconds();

    std::vector<int64_t> new_len(B);
    auto base_acc = base.accessor<int64_t, 1>();
    const int64_t emitted_before = st.emitted;
    for (int64_t b = 0; b < B; ++b) {
      if (out.done(b)) {
        new_len[b] = base_acc[b];  // finished: keep its cache as it was
        continue;
      }
      const Acceptance a = greedy ? accept_greedy(vlogits[b], drafts.tokens[b])
                                  : accept_sampled(vprobs[b], qprobs[b], drafts.tokens[b], gen);
      ++st.verify_steps;
      st.drafted += gamma;
      st.accepted += a.accepted;
      // Emit the accepted drafts and the next token (fewer when the
      // sequence ends among them).
      int64_t emitted = 0;
      bool open = true;
      for (int64_t i = 0; i < a.accepted && open; ++i) {
        open = out.emit(b, drafts.tokens[b][i]);
        ++emitted;
      }
      if (open) {
        out.emit(b, a.next_token);
        ++emitted;
      }
      st.emitted += emitted;
      // The cache keeps the pending token and every emitted token but the
      // last (the next pending one): all verifier entries.
      new_len[b] = base_acc[b] + emitted;
      pending[b] = a.next_token;
    }
    cache->set_lengths(at::tensor(new_len, at::kLong));
    control.observe(static_cast<double>(st.emitted - emitted_before), step_watch.seconds());
  }
  result.decode_seconds = watch.seconds();
  if (cache_out) *cache_out = std::move(cache);
  return result;
}

}  // namespace

GenerationResult generate(nn::Transformer& model, quant::QuantizedModel& packed,
                          const std::vector<std::vector<int64_t>>& prompts,
                          const GenerateOptions& options) {
  return generate(model, packed, prompts, options, nullptr);
}

GenerationResult generate(nn::Transformer& model, quant::QuantizedModel& packed,
                          const std::vector<std::vector<int64_t>>& prompts,
                          const GenerateOptions& options, std::unique_ptr<nn::KVCache>* cache_out) {
  return translate_errors(
      "specdec::generate",
      [&] {
        check_options(model, packed, options);
        return options.speculative ? qspec_decoding(model, packed, prompts, options, cache_out)
                                   : plain_decoding(model, packed, prompts, options, cache_out);
      },
      ErrorCode::kInvalidArgument);
}

void parse_decoding(const std::string& name, GenerateOptions* options) {
  if (name == "qspec") {
    options->speculative = true;
    return;
  }
  try {
    options->mode = quant::parse_mode(name);
  } catch (const InvalidArgument&) {
    TESSERA_THROW(InvalidArgument, "unknown decoding mode '", name,
                  "' (expected fp, w4a16, w4a8, w4a4 or qspec)");
  }
  options->speculative = false;
}

std::string decoding_name(const GenerateOptions& options) {
  return options.speculative ? "qspec" : quant::mode_name(options.mode);
}

}  // namespace tessera::specdec
