#include "tessera/specdec/qspec.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <limits>

#include "tessera/core/error.h"
#include "tessera/core/metrics.h"

namespace tessera::specdec {

const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::kFloat: return "fp";
    case Mode::kW4A16: return "w4a16";
    case Mode::kW4A8: return "w4a8";
    case Mode::kW4A4: return "w4a4";
    case Mode::kQSpec: return "qspec";
  }
  return "?";
}

Mode parse_mode(const std::string& name) {
  for (Mode m : {Mode::kFloat, Mode::kW4A16, Mode::kW4A8, Mode::kW4A4, Mode::kQSpec}) {
    if (name == mode_name(m)) return m;
  }
  TESSERA_THROW(InvalidArgument, "unknown decoding mode '", name,
                "' (expected fp, w4a16, w4a8, w4a4 or qspec)");
}

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
  TESSERA_CHECK(verifier_logits.dim() == 2 && verifier_logits.size(0) == gamma + 1,
                InvalidArgument, "accept_greedy: expected logits [", gamma + 1, ", vocab]");
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

quant::Mode packed_mode(Mode m) {
  switch (m) {
    case Mode::kW4A16: return quant::Mode::kW4A16;
    case Mode::kW4A8: return quant::Mode::kW4A8;
    case Mode::kW4A4: return quant::Mode::kW4A4;
    default: return quant::Mode::kFloat;
  }
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
  const nn::SamplingOptions& so = options.sampling;
  const QSpecOptions& qo = options.qspec;
  const nn::PaddedPrompts padded = nn::pad_prompts(prompts);
  TESSERA_CHECK(so.max_new_tokens >= 0, InvalidArgument, "specdec::generate: max_new_tokens < 0");
  TESSERA_CHECK(options.mode == Mode::kFloat || model.linear_override().get() == &packed,
                InvalidArgument,
                "specdec::generate: install the packed weights first (model.set_linear_override)");
  const bool spec = options.mode == Mode::kQSpec;
  if (spec) {
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
  at::NoGradGuard no_grad;
  quant::ScopedMode scoped(packed, spec ? qo.verify_mode : packed_mode(options.mode));

  const int64_t B = static_cast<int64_t>(prompts.size());
  const int64_t longest = padded.longest;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(so.seed);
  const bool greedy = so.temperature <= 0;

  GenerationResult result;
  result.tokens.assign(B, {});
  result.finish_reason.assign(B, "length");
  std::vector<bool> done(B, so.max_new_tokens == 0);
  auto is_stop = [&](int64_t t) {
    return std::find(so.stop_tokens.begin(), so.stop_tokens.end(), t) != so.stop_tokens.end();
  };
  // Appends one token to sequence b; false once the sequence is finished.
  auto emit = [&](int64_t b, int64_t token) {
    if (done[b]) return false;
    result.tokens[b].push_back(token);
    ++result.new_tokens;
    if (is_stop(token)) {
      done[b] = true;
      result.finish_reason[b] = "stop";
    } else if (static_cast<int64_t>(result.tokens[b].size()) >= so.max_new_tokens) {
      done[b] = true;
    }
    return !done[b];
  };
  auto all_done = [&] { return std::all_of(done.begin(), done.end(), [](bool d) { return d; }); };
  auto next_tokens = [&](const at::Tensor& logits) {  // [B, V] -> [B]
    return greedy ? logits.argmax(-1) : nn::sample_next(logits, so, gen);
  };

  const int64_t headroom = spec ? qo.max_gamma + 1 : 1;
  auto cache = std::make_unique<nn::KVCache>(model.config(), B,
                                             longest + std::max<int64_t>(so.max_new_tokens, 1) + headroom,
                                             at::TensorOptions().dtype(at::kFloat));
  result.cache_bytes = cache->bytes();

  // Prefill (in the verify mode for QSPEC): right-padded prompts.
  Stopwatch watch;
  nn::ForwardOptions fwd;
  fwd.cache = cache.get();
  fwd.batch_invariant = true;
  fwd.lengths = padded.lengths;
  fwd.last_logits_only = true;
  at::Tensor first = next_tokens(model.forward(padded.ids, fwd).logits.select(1, 0));
  std::vector<int64_t> pending(B, 0);  // the last emitted token, not yet in the cache
  {
    auto f = first.accessor<int64_t, 1>();
    for (int64_t b = 0; b < B; ++b) {
      pending[b] = f[b];
      emit(b, f[b]);
    }
  }
  result.prefill_seconds = watch.seconds();
  watch.reset();
  fwd.last_logits_only = false;

  if (!spec) {
    fwd.lengths = at::ones({B}, at::kLong);
    while (!all_done()) {
      at::Tensor last = at::tensor(pending, at::kLong).view({B, 1});
      at::Tensor next = next_tokens(model.forward(last, fwd).logits.select(1, 0));
      auto n = next.accessor<int64_t, 1>();
      for (int64_t b = 0; b < B; ++b) {
        pending[b] = n[b];
        emit(b, n[b]);
      }
    }
    result.decode_seconds = watch.seconds();
    if (cache_out) *cache_out = std::move(cache);
    return result;
  }

  int64_t gamma = qo.gamma;
  SpecStats& st = result.stats;
  st.steps_per_gamma.assign(qo.max_gamma + 1, 0);
  // Adaptive gamma: tokens and seconds summed per gamma (rate < 0: untried).
  std::vector<double> tokens_at(qo.max_gamma + 1, 0.0), seconds_at(qo.max_gamma + 1, 0.0);
  std::vector<double> rate(qo.max_gamma + 1, -1.0);
  int64_t since_explore = 0, explore_interval = qo.explore_every;
  bool explore_up = true, exploring = false;
  int64_t best_before = gamma, adaptive_steps = 0;
  while (!all_done()) {
    Stopwatch step_watch;
    ++st.steps_per_gamma[gamma];
    // Cache lengths before the step: every kept entry is the verifier's.
    at::Tensor base = cache->lengths().clone();
    // Draft gamma tokens per sequence in the draft mode.
    std::vector<std::vector<int64_t>> draft(B);
    std::vector<at::Tensor> draft_probs;  // per draft position: [B, V] (sampling only)
    Stopwatch draft_watch;
    {
      quant::ScopedMode draft_mode(packed, qo.draft_mode);
      fwd.lengths = at::ones({B}, at::kLong);
      std::vector<int64_t> cur = pending;
      for (int64_t i = 0; i < gamma; ++i) {
        at::Tensor logits = model.forward(at::tensor(cur, at::kLong).view({B, 1}), fwd).logits.select(1, 0);
        at::Tensor next;
        if (greedy) {
          next = logits.argmax(-1);
        } else {
          at::Tensor q = sampling_probs(logits, so);
          draft_probs.push_back(q);
          next = at::multinomial(q, 1, false, gen).squeeze(-1);
        }
        auto n = next.accessor<int64_t, 1>();
        for (int64_t b = 0; b < B; ++b) {
          draft[b].push_back(n[b]);
          cur[b] = n[b];
        }
      }
    }
    st.draft_seconds += draft_watch.seconds();

    // Verify: roll the cache back and run [pending, draft...] in one forward;
    // it overwrites the drafted positions' keys and values.
    Stopwatch verify_watch;
    cache->set_lengths(base);
    at::Tensor block = at::empty({B, gamma + 1}, at::kLong);
    for (int64_t b = 0; b < B; ++b) {
      block[b][0] = pending[b];
      for (int64_t i = 0; i < gamma; ++i) block[b][i + 1] = draft[b][i];
    }
    fwd.lengths = at::full({B}, gamma + 1, at::kLong);
    at::Tensor vlogits = model.forward(block, fwd).logits;  // [B, gamma + 1, V]
    at::Tensor vprobs = greedy ? at::Tensor() : sampling_probs(vlogits.reshape({B * (gamma + 1), -1}), so)
                                                    .view({B, gamma + 1, -1});
    at::Tensor qprobs;  // [B, gamma, V]
    if (!greedy) {
      qprobs = gamma == 0 ? at::empty({B, 0, vprobs.size(2)}, vprobs.options()) : at::stack(draft_probs, 1);
    }
    st.verify_seconds += verify_watch.seconds();

    std::vector<int64_t> new_len(B);
    auto base_acc = base.accessor<int64_t, 1>();
    const int64_t emitted_before = st.emitted;
    for (int64_t b = 0; b < B; ++b) {
      if (done[b]) {
        new_len[b] = base_acc[b];  // finished: keep its cache as it was
        continue;
      }
      Acceptance a = greedy ? accept_greedy(vlogits[b], draft[b])
                            : accept_sampled(vprobs[b], qprobs[b], draft[b], gen);
      ++st.verify_steps;
      st.drafted += gamma;
      st.accepted += a.accepted;
      // Emit the accepted drafts and the next token (fewer when the
      // sequence ends among them).
      int64_t emitted = 0;
      bool open = true;
      for (int64_t i = 0; i < a.accepted && open; ++i) {
        open = emit(b, draft[b][i]);
        ++emitted;
      }
      if (open) {
        emit(b, a.next_token);
        ++emitted;
      }
      st.emitted += emitted;
      // The cache keeps the pending token and every emitted token but the
      // last (the next pending one): all verifier entries.
      new_len[b] = base_acc[b] + emitted;
      pending[b] = a.next_token;
    }
    cache->set_lengths(at::tensor(new_len, at::kLong));
    // The first step also pays one-time costs (first touch of the cache and
    // of scratch buffers): it is not a measurement.
    if (qo.adaptive_gamma && ++adaptive_steps > 1) {
      const double seconds = std::max(step_watch.seconds(), 1e-9);
      tokens_at[gamma] += static_cast<double>(st.emitted - emitted_before);
      seconds_at[gamma] += seconds;
      rate[gamma] = tokens_at[gamma] / seconds_at[gamma];
      int64_t best = gamma;
      for (int64_t g = qo.min_gamma; g <= qo.max_gamma; ++g) {
        if (rate[g] > rate[best]) best = g;
      }
      // An exploration that did not change the best doubles the wait before
      // the next one (up to 32x): a settled choice costs little.
      if (exploring) {
        explore_interval = best == best_before ? std::min(explore_interval * 2, qo.explore_every * 32)
                                               : qo.explore_every;
        exploring = false;
      }
      best_before = best;
      ++since_explore;
      gamma = best;
      // The smallest gamma first (with min_gamma 0: plain decoding, the
      // baseline), then untried neighbours of the best (a short walk towards
      // the better side), then now and then a neighbour.
      const bool below = best - 1 >= qo.min_gamma && rate[best - 1] < 0;
      const bool above = best + 1 <= qo.max_gamma && rate[best + 1] < 0;
      if (rate[qo.min_gamma] < 0) {
        gamma = qo.min_gamma;
      } else if (below || above) {
        gamma = below ? best - 1 : best + 1;
      } else if (since_explore >= explore_interval) {
        since_explore = 0;
        exploring = true;
        // Try a neighbour of the best, alternating up and down.
        int64_t next = best + (explore_up ? 1 : -1);
        if (next < qo.min_gamma || next > qo.max_gamma) next = best + (explore_up ? -1 : 1);
        if (next >= qo.min_gamma && next <= qo.max_gamma) gamma = next;
        explore_up = !explore_up;
      }
    }
  }
  result.decode_seconds = watch.seconds();
  if (cache_out) *cache_out = std::move(cache);
  return result;
}

}  // namespace tessera::specdec
