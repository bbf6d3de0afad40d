// The engine thread: one Scheduler step at a time — schedule, run the model
// (with QSPEC drafting and verification where enabled), sample, update the
// scheduler, deliver events.
//
// Locking: Impl::mu guards the scheduler, the request and sequence maps and
// the counters. The engine thread holds it while scheduling and while
// applying a step's results, and releases it for the model work (which
// touches only the KV cache, the model and the per-sample state, all owned
// by this thread) and for delivering events (callbacks may call the engine).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine_impl.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"

namespace tessera::serve {

using detail::PendingEvent;
using detail::RequestState;
using detail::SampleState;

namespace {

constexpr const char* kLog = "serve";

double seconds(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

// A child sample created when the first sample's first token is drawn
// (parallel sampling): its own first token comes from the same logits.
struct ForkChild {
  std::unique_ptr<SampleState> sample;
  int64_t token = 0;
  std::optional<detail::TokenLogprobs> logprobs;
};

// What the model step decided for each scheduled sequence (by step index).
struct StepResult {
  std::vector<std::optional<int64_t>> tokens;
  std::vector<std::optional<detail::TokenLogprobs>> logprobs;
  std::vector<std::vector<ForkChild>> forks;
  int64_t drafted = 0, accepted = 0;
  std::string error;  // non-empty: the step failed
};

enum class Kind { kPlain, kSkip, kSpec };

}  // namespace

namespace {

// Everything the engine thread does, with Impl's state at hand.
class Loop {
 public:
  explicit Loop(Engine::Impl& m) : m_(m) {}

  void run();

 private:
  void process_cancels(std::vector<PendingEvent>& events);
  void publish_stats();
  void deliver(std::unique_lock<std::mutex>& lock, std::vector<PendingEvent>& events);
  void update_bank(const std::vector<SampleState*>& samples);
  StepResult execute(const SchedulerStep& step, const std::vector<SampleState*>& samples);
  void apply(const SchedulerStep& step, const std::vector<SampleState*>& samples,
             StepResult& result, std::vector<PendingEvent>& events);
  void emit_token(SampleState* s, int64_t token, std::optional<FinishReason> finish,
                  const std::optional<detail::TokenLogprobs>& logprobs,
                  std::vector<PendingEvent>& events);
  void finish_sample(SampleState* s, FinishReason reason, TokenEvent event,
                     std::vector<PendingEvent>& events);
  void release_scratch(SampleState* s);
  std::shared_ptr<RequestState> shared(RequestState* r) const { return m_.requests.at(r->id); }
  std::unique_ptr<SampleState> make_child(RequestState& r, int64_t index) const;
  std::vector<TopLogprob> top_of(const detail::TokenLogprobs& lp) const;
  int64_t adapter_index(const RequestState& r) const;

  Engine::Impl& m_;
  std::vector<std::pair<float, int64_t>> scratch_;  // sampling scratch
  std::vector<uint8_t> mask_;
};

std::unique_ptr<SampleState> Loop::make_child(RequestState& r, int64_t index) const {
  auto s = std::make_unique<SampleState>();
  s->request = &r;
  s->index = index;
  s->rng = detail::SampleRng(detail::sample_seed(r.seed, index));
  s->stops = StopStringMatcher(r.request.params.stop);
  if (r.request.params.json_object) s->json.emplace(JsonGrammarOptions{32, 16});
  return s;
}

std::vector<TopLogprob> Loop::top_of(const detail::TokenLogprobs& lp) const {
  std::vector<TopLogprob> out;
  for (const auto& [token, value] : lp.top) out.push_back({token, m_.token_bytes(token), value});
  return out;
}

int64_t Loop::adapter_index(const RequestState& r) const {
  if (!r.adapter) return -1;
  auto it = std::find(m_.bank_members.begin(), m_.bank_members.end(), r.adapter.get());
  return it == m_.bank_members.end() ? -1 : it - m_.bank_members.begin();
}

void Loop::release_scratch(SampleState* s) {
  for (int32_t b : s->scratch) m_.free_scratch.push_back(b);
  s->scratch.clear();
}

// Under the lock: cancelled requests' unfinished samples end with "abort".
void Loop::process_cancels(std::vector<PendingEvent>& events) {
  std::vector<uint64_t> ids;
  ids.swap(m_.pending_cancels);
  for (uint64_t id : ids) {
    auto it = m_.requests.find(id);
    if (it == m_.requests.end()) continue;
    RequestState& r = *it->second;
    r.forked = true;  // no more samples will be created
    for (auto& s : r.samples) {
      if (s->finished) continue;
      TokenEvent e;
      e.request_id = r.id;
      e.index = s->index;
      e.prompt_tokens = static_cast<int64_t>(r.prompt.size());
      e.completion_tokens = s->generated;
      finish_sample(s.get(), FinishReason::kAbort, std::move(e), events);
    }
  }
}

// Under the lock: ends a sample (its last event), freeing its sequence.
void Loop::finish_sample(SampleState* s, FinishReason reason, TokenEvent event,
                         std::vector<PendingEvent>& events) {
  RequestState& r = *s->request;
  s->finished = true;
  if (s->seq >= 0) {
    // An aborted sequence leaves the scheduler too (its blocks are freed),
    // or the next schedule() would run a sequence nobody owns.
    if (m_.scheduler->contains(s->seq)) {
      if (reason == FinishReason::kAbort) {
        m_.scheduler->cancel(s->seq);
      } else {
        m_.scheduler->finish(s->seq, reason);
      }
    }
    m_.by_seq.erase(s->seq);
  }
  release_scratch(s);
  s->queued.clear();
  m_.success(reason).increment();
  ++r.finished_samples;
  event.finished = true;
  event.finish_reason = finish_reason_name(reason);
  PendingEvent pe{shared(&r), std::move(event), false};
  const bool all_samples = r.forked || r.request.params.n == 1;
  if (all_samples && r.finished_samples == static_cast<int64_t>(r.samples.size())) {
    pe.request_done = true;
    ++m_.finished_requests;
    m_.e2e->observe(seconds(r.submitted, Clock::now()));
  }
  events.push_back(std::move(pe));
}

// Delivers events without the lock, then forgets finished requests.
void Loop::deliver(std::unique_lock<std::mutex>& lock, std::vector<PendingEvent>& events) {
  if (events.empty()) return;
  lock.unlock();
  for (PendingEvent& pe : events) {
    if (pe.request->callback) {
      try {
        pe.request->callback(pe.event);
      } catch (const std::exception& e) {
        TESSERA_LOG(Error, kLog) << "token callback of request " << pe.request->id
                                 << " threw: " << e.what();
      }
    }
    if (pe.request_done) {
      std::lock_guard<std::mutex> hl(pe.request->handle->mu);
      pe.request->handle->finished = true;
      pe.request->handle->cv.notify_all();
    }
  }
  lock.lock();
  for (PendingEvent& pe : events) {
    if (pe.request_done) m_.requests.erase(pe.request->id);
  }
  events.clear();
  m_.progress.notify_all();
}

// Under the lock: the AdapterBank holds every adapter pinned by a live
// request; rebuilt when a scheduled sequence's adapter is missing.
void Loop::update_bank(const std::vector<SampleState*>& samples) {
  bool missing = false;
  for (SampleState* s : samples) {
    if (s->request->adapter && adapter_index(*s->request) < 0) missing = true;
  }
  if (!missing) return;
  std::vector<std::shared_ptr<lora::Adapter>> members;
  for (const auto& [id, r] : m_.requests) {
    if (r->adapter && std::none_of(members.begin(), members.end(),
                                   [&](const auto& a) { return a.get() == r->adapter.get(); })) {
      members.push_back(r->adapter);
    }
  }
  auto bank = std::make_shared<lora::AdapterBank>();
  m_.bank_members.clear();
  for (auto& a : members) {
    bank->add(a);
    m_.bank_members.push_back(a.get());
  }
  m_.bank = bank;
}

StepResult Loop::execute(const SchedulerStep& step, const std::vector<SampleState*>& samples) {
  const size_t n = step.sequences.size();
  StepResult res;
  res.tokens.assign(n, std::nullopt);
  res.logprobs.assign(n, std::nullopt);
  res.forks.resize(n);
  try {
    nn::PagedKVCache& cache = *m_.cache;
    const int64_t bs = cache.block_size();
    const int64_t V = m_.vocab;
    // (Under tensor parallelism the copies travel with the step's forward.)
    if (!m_.tp) {
      for (const BlockCopy& c : step.copies) cache.copy_block(c.src, c.dst);
    }
    m_.model->set_adapter(m_.bank_members.empty() ? nullptr : m_.bank);

    // Which sequences skip the model (QSPEC-decided tokens with their keys
    // and values in place), which speculate, which run plainly.
    std::vector<Kind> kind(n, Kind::kPlain);
    std::vector<int64_t> gamma(n, 0);
    std::vector<std::vector<int32_t>> table(n);
    for (size_t i = 0; i < n; ++i) {
      const ScheduledSequence& ss = step.sequences[i];
      SampleState* s = samples[i];
      table[i] = ss.block_table;
      if (!m_.qspec) continue;
      const int64_t last = ss.context_length() - 1;
      if (!s->queued.empty() && s->kv_valid_until >= last && ss.sample) {
        kind[i] = Kind::kSkip;
        // Verified entries that went to scratch blocks move to the blocks
        // the scheduler has now given those positions.
        for (int64_t q = ss.start_position; q <= last; ++q) {
          const int32_t real = ss.block_table[q / bs], used = s->spec_table[q / bs];
          if (real != used) cache.copy_slots(used, q % bs, real, q % bs, 1);
        }
        continue;
      }
      const RequestState& r = *s->request;
      const SamplingParams& p = r.request.params;
      if (ss.token_ids.size() != 1 || !ss.sample || r.sampling.temperature > 0 || s->json ||
          p.logprobs || !s->queued.empty()) {
        continue;
      }
      const int64_t g = std::min<int64_t>(m_.options.qspec_gamma, p.max_tokens - s->generated - 1);
      if (g < 1) continue;
      const int64_t p0 = ss.start_position;
      const int64_t need = (p0 + g) / bs + 1 - static_cast<int64_t>(ss.block_table.size());
      if (need > static_cast<int64_t>(m_.free_scratch.size())) continue;
      release_scratch(s);
      for (int64_t k = 0; k < need; ++k) {
        s->scratch.push_back(m_.free_scratch.back());
        m_.free_scratch.pop_back();
        table[i].push_back(s->scratch.back());
      }
      kind[i] = Kind::kSpec;
      gamma[i] = g;
    }

    // QSPEC drafts: gamma rounds in the draft mode, one token per
    // speculating sequence, each from the last (its keys and values go to
    // the positions after the pending token; the verifier rewrites them).
    std::vector<std::vector<int64_t>> drafts(n);
    int64_t rounds = 0;
    for (size_t i = 0; i < n; ++i) rounds = std::max(rounds, gamma[i]);
    if (rounds > 0) {
      quant::ScopedMode draft_mode(*m_.packed, quant::Mode::kW4A4);
      for (int64_t round = 0; round < rounds; ++round) {
        nn::PagedBatch batch;
        batch.cache = &cache;
        std::vector<int64_t> ids;
        std::vector<size_t> who;
        for (size_t i = 0; i < n; ++i) {
          if (gamma[i] <= round) continue;
          const ScheduledSequence& ss = step.sequences[i];
          ids.push_back(round == 0 ? ss.token_ids[0] : drafts[i].back());
          batch.sequences.push_back(
              {1, ss.start_position + round, table[i], adapter_index(*samples[i]->request)});
          batch.logits_rows.push_back(static_cast<int64_t>(who.size()));
          who.push_back(i);
        }
        nn::ForwardOptions fo;
        fo.paged = &batch;
        at::Tensor logits = m_.model->forward(at::tensor(ids, at::kLong).view({1, -1}), fo)
                                .logits.squeeze(0)
                                .contiguous();
        const float* lp = logits.data_ptr<float>();
        for (size_t k = 0; k < who.size(); ++k)
          drafts[who[k]].push_back(detail::argmax(lp + k * V, V, nullptr));
      }
    }

    // The main forward: prefill chunks, plain decodes and verifications.
    nn::PagedBatch batch;
    batch.cache = &cache;
    std::vector<int64_t> ids;
    std::vector<int64_t> first_row(n, -1);  // first logits row of each sequence
    // Echo with logprobs: (step index, prompt position) of logits rows that
    // score the next prompt token.
    std::vector<std::pair<size_t, int64_t>> prompt_rows;
    std::vector<int64_t> prompt_row_index;
    // Vision-language requests: rows of `ids` that take image tokens.
    struct ImageRow {
      const RequestState* request;
      int64_t row;    // in ids
      int64_t token;  // row of the request's image_embeds
    };
    std::vector<ImageRow> image_rows;
    for (size_t i = 0; i < n; ++i) {
      if (kind[i] == Kind::kSkip) continue;
      const ScheduledSequence& ss = step.sequences[i];
      RequestState& r = *samples[i]->request;
      const int64_t base = static_cast<int64_t>(ids.size());
      ids.insert(ids.end(), ss.token_ids.begin(), ss.token_ids.end());
      if (kind[i] == Kind::kSpec) ids.insert(ids.end(), drafts[i].begin(), drafts[i].end());
      const int64_t count = static_cast<int64_t>(ids.size()) - base;
      batch.sequences.push_back({count, ss.start_position, table[i], adapter_index(r)});
      if (r.image_embeds.defined()) {
        // Prompt positions of this chunk that hold image tokens.
        const int64_t p0 = ss.start_position;
        const int64_t p1 = p0 + static_cast<int64_t>(ss.token_ids.size());
        const auto& pos = r.image_positions;
        for (auto it = std::lower_bound(pos.begin(), pos.end(), p0); it != pos.end() && *it < p1;
             ++it) {
          image_rows.push_back({&r, base + (*it - p0), it - pos.begin()});
        }
      }
      if (r.request.echo && r.request.params.logprobs && samples[i]->index == 0) {
        const int64_t P = static_cast<int64_t>(r.prompt.size());
        for (int64_t t = 0; t < count; ++t) {
          const int64_t pos = ss.start_position + t;
          if (pos < P - 1 && pos >= r.prompt_logprobs_done) {
            prompt_rows.emplace_back(i, pos);
            prompt_row_index.push_back(static_cast<int64_t>(batch.logits_rows.size()));
            batch.logits_rows.push_back(base + t);
          }
        }
      }
      if (kind[i] == Kind::kSpec) {
        first_row[i] = static_cast<int64_t>(batch.logits_rows.size());
        for (int64_t t = 0; t < count; ++t) batch.logits_rows.push_back(base + t);
      } else if (ss.sample) {
        first_row[i] = static_cast<int64_t>(batch.logits_rows.size());
        batch.logits_rows.push_back(base + count - 1);
      }
    }
    at::Tensor logits;
    const float* lp = nullptr;
    if (m_.tp) {
      // Text models in fp32 only (no drafts, images or adapters): the other
      // ranks run the same copies and forward on their shards.
      detail::StepMessage message;
      message.copies = step.copies;
      message.ids = ids;
      message.batch = batch;
      message.batch.cache = nullptr;
      message.hidden_only = batch.logits_rows.empty();
      detail::broadcast_step(*m_.tp, message);
      at::Tensor out = detail::run_step(*m_.model, cache, message);
      if (out.defined()) {
        logits = out.squeeze(0).contiguous();
        lp = logits.data_ptr<float>();
      }
    } else if (!ids.empty()) {
      nn::ForwardOptions fo;
      fo.paged = &batch;
      if (batch.logits_rows.empty()) fo.hidden_only = true;  // nothing to sample: skip the LM head
      const at::Tensor id_tensor = at::tensor(ids, at::kLong).view({1, -1});
      if (!image_rows.empty()) {
        // The ids' embeddings with the image rows replaced: the same values
        // the forward would look up, so text positions are unchanged bit
        // for bit (tested in nn_vlm_test).
        at::Tensor embeds =
            at::embedding(m_.model->parameter("model.embed_tokens.weight"), id_tensor);
        at::Tensor flat = embeds.view({-1, embeds.size(-1)});
        for (size_t a = 0; a < image_rows.size();) {
          size_t b = a;
          std::vector<int64_t> rows, tokens;
          for (; b < image_rows.size() && image_rows[b].request == image_rows[a].request; ++b) {
            rows.push_back(image_rows[b].row);
            tokens.push_back(image_rows[b].token);
          }
          flat.index_copy_(
              0, at::tensor(rows, at::kLong),
              image_rows[a].request->image_embeds.index_select(0, at::tensor(tokens, at::kLong)));
          a = b;
        }
        fo.input_embeds = embeds;
      }
      nn::ForwardOutput out = m_.model->forward(id_tensor, fo);
      if (!batch.logits_rows.empty()) {
        logits = out.logits.squeeze(0).contiguous();
        lp = logits.data_ptr<float>();
      }
    }

    // Prompt log-probabilities.
    for (size_t k = 0; k < prompt_rows.size(); ++k) {
      RequestState& r = *samples[prompt_rows[k].first]->request;
      const int64_t pos = prompt_rows[k].second;
      if (r.prompt_logprobs.empty()) {
        r.prompt_logprobs.assign(r.prompt.size(), std::numeric_limits<double>::quiet_NaN());
        r.prompt_top.assign(r.prompt.size(), {});
      }
      const auto lpk = detail::token_logprobs(lp + prompt_row_index[k] * V, V, r.prompt[pos + 1],
                                              *r.request.params.logprobs);
      r.prompt_logprobs[pos + 1] = lpk.logprob;
      r.prompt_top[pos + 1] = top_of(lpk);
      r.prompt_logprobs_done = std::max(r.prompt_logprobs_done, pos + 1);
    }

    // Tokens.
    for (size_t i = 0; i < n; ++i) {
      const ScheduledSequence& ss = step.sequences[i];
      SampleState* s = samples[i];
      RequestState& r = *s->request;
      const SamplingParams& p = r.request.params;
      if (kind[i] == Kind::kSkip) {
        res.tokens[i] = s->queued.front();
        s->queued.pop_front();
        if (s->queued.empty()) release_scratch(s);
        continue;
      }
      if (kind[i] == Kind::kSpec) {
        // Greedy acceptance: the drafts the verifier agrees with, then its
        // own next token. The first goes to the scheduler now, the rest over
        // the next steps.
        const float* rows = lp + first_row[i] * V;
        int64_t accepted = 0;
        int64_t next = detail::argmax(rows, V, nullptr);
        while (accepted < gamma[i] && next == drafts[i][accepted]) {
          ++accepted;
          next = detail::argmax(rows + accepted * V, V, nullptr);
        }
        std::vector<int64_t> emitted(drafts[i].begin(), drafts[i].begin() + accepted);
        emitted.push_back(next);
        res.tokens[i] = emitted[0];
        s->queued.assign(emitted.begin() + 1, emitted.end());
        s->kv_valid_until = ss.start_position + accepted;
        s->spec_table = table[i];
        if (s->queued.empty()) release_scratch(s);
        res.drafted += gamma[i];
        res.accepted += accepted;
        continue;
      }
      if (!ss.sample) continue;
      if (!s->queued.empty()) {  // decided before a preemption
        res.tokens[i] = s->queued.front();
        s->queued.pop_front();
        continue;
      }
      const float* row = lp + first_row[i] * V;
      const uint8_t* allowed = nullptr;
      if (s->json) {
        m_.json().fill_mask(*s->json, &mask_);
        allowed = mask_.data();
      }
      int64_t token = detail::sample_token(row, V, r.sampling, allowed, s->rng, &scratch_);
      if (token < 0)
        token = detail::argmax(row, V, nullptr);  // nothing allowed: let the model choose
      res.tokens[i] = token;
      if (p.logprobs) res.logprobs[i] = detail::token_logprobs(row, V, token, *p.logprobs);
      // Parallel sampling: the other samples draw their first tokens from
      // the same logits now, and fork from this sequence once it is updated.
      if (s->index == 0 && p.n > 1 && !r.forked && s->generated == 0) {
        for (int64_t k = 1; k < p.n; ++k) {
          ForkChild child;
          child.sample = make_child(r, k);
          const uint8_t* child_allowed = nullptr;
          if (child.sample->json) {
            m_.json().fill_mask(*child.sample->json, &mask_);
            child_allowed = mask_.data();
          }
          child.token =
              detail::sample_token(row, V, r.sampling, child_allowed, child.sample->rng, &scratch_);
          if (child.token < 0) child.token = detail::argmax(row, V, nullptr);
          if (p.logprobs) child.logprobs = detail::token_logprobs(row, V, child.token, *p.logprobs);
          res.forks[i].push_back(std::move(child));
        }
      }
    }
  } catch (const std::exception& e) {
    res.error = e.what();
  }
  return res;
}

// Under the lock: one token of a sample, with its text and stop checks.
void Loop::emit_token(SampleState* s, int64_t token, std::optional<FinishReason> finish,
                      const std::optional<detail::TokenLogprobs>& logprobs,
                      std::vector<PendingEvent>& events) {
  RequestState& r = *s->request;
  const Clock::time_point now = Clock::now();
  ++m_.generation_tokens;
  m_.generation_tokens_total->increment();
  if (!r.first_token) {
    r.first_token = true;
    m_.ttft->observe(seconds(r.submitted, now));
  }
  if (s->generated > 0) m_.itl->observe(seconds(s->last_token_time, now));
  s->last_token_time = now;
  ++s->generated;

  if (s->generated == 1 && r.request.echo) {
    TokenEvent echo;
    echo.request_id = r.id;
    echo.index = s->index;
    echo.tokens = r.prompt;
    for (int64_t t : r.prompt) echo.text += m_.token_bytes(t);
    if (r.request.params.logprobs) {
      echo.logprobs = r.prompt_logprobs;
      echo.top_logprobs = r.prompt_top;
      if (echo.logprobs.empty()) {  // a one-token prompt
        echo.logprobs.assign(r.prompt.size(), std::numeric_limits<double>::quiet_NaN());
        echo.top_logprobs.assign(r.prompt.size(), {});
      }
    }
    echo.prompt_tokens = static_cast<int64_t>(r.prompt.size());
    events.push_back({shared(&r), std::move(echo), false});
  }

  TokenEvent e;
  e.request_id = r.id;
  e.index = s->index;
  e.tokens = {token};
  e.prompt_tokens = static_cast<int64_t>(r.prompt.size());
  e.completion_tokens = s->generated;
  if (s->generated == 1) e.ttft_seconds = seconds(r.submitted, now);
  if (logprobs) {
    e.logprobs = {logprobs->logprob};
    e.top_logprobs = {top_of(*logprobs)};
  }
  // A stop token (EOS or the request's) ends the sequence and adds no text.
  const bool stop_token = finish == FinishReason::kStop;
  if (!stop_token) {
    auto res = s->stops.feed(s->utf8.feed(m_.token_bytes(token)));
    e.text = std::move(res.text);
    if (res.stop_index) finish = FinishReason::kStop;
    if (s->json) (void)m_.json().accept_token(&*s->json, token);
  }
  if (!finish) {
    events.push_back({shared(&r), std::move(e), false});
    return;
  }
  if (!s->stops.stopped()) {
    const std::string tail = s->utf8.flush();
    if (!tail.empty()) {
      auto res = s->stops.feed(tail);
      e.text += res.text;
    }
    if (!s->stops.stopped()) e.text += s->stops.flush();
  }
  finish_sample(s, *finish, std::move(e), events);
}

void Loop::apply(const SchedulerStep& step, const std::vector<SampleState*>& samples,
                 StepResult& result, std::vector<PendingEvent>& events) {
  m_.spec_drafted += result.drafted;
  m_.spec_accepted += result.accepted;
  if (!result.error.empty()) {
    TESSERA_LOG(Error, kLog) << "engine step " << step.step << " failed; aborting its "
                             << step.sequences.size() << " sequences: " << result.error;
    for (size_t i = 0; i < step.sequences.size(); ++i) {
      SampleState* s = samples[i];
      s->request->forked = true;  // no samples will be created any more
      if (s->finished) continue;
      TokenEvent e;
      e.request_id = s->request->id;
      e.index = s->index;
      e.completion_tokens = s->generated;
      finish_sample(s, FinishReason::kAbort, std::move(e), events);
    }
    (void)m_.scheduler->update(std::vector<std::optional<int64_t>>(step.sequences.size()));
    return;
  }
  std::unordered_map<SequenceId, size_t> index_of;
  for (size_t i = 0; i < step.sequences.size(); ++i) index_of[step.sequences[i].seq_id] = i;
  const std::vector<SequenceOutput> outputs = m_.scheduler->update(result.tokens);
  for (const SequenceOutput& out : outputs) {
    const size_t i = index_of.at(out.seq_id);
    SampleState* s = samples[i];
    RequestState& r = *s->request;
    // Forks first: the parent must still be in the scheduler.
    std::vector<std::pair<SampleState*, SequenceOutput>> children;
    for (ForkChild& child : result.forks[i]) {
      SampleState* c = child.sample.get();
      r.samples.push_back(std::move(child.sample));
      if (m_.scheduler->contains(out.seq_id)) {
        const SequenceOutput co = m_.scheduler->fork_sequence(out.seq_id, child.token);
        c->seq = co.seq_id;
        if (!co.finish_reason) m_.by_seq[c->seq] = c;
        children.emplace_back(c, co);
        continue;
      }
      // The parent ended at its first token: a child that goes on starts
      // over as its own sequence (prompt + its token), its first token done.
      const auto& stops = r.stop_token_ids;
      std::optional<FinishReason> reason;
      if (std::find(stops.begin(), stops.end(), child.token) != stops.end()) {
        reason = FinishReason::kStop;
      } else if (r.request.params.max_tokens == 1) {
        reason = FinishReason::kLength;
      } else {
        Request again;
        again.prompt_token_ids = r.prompt;
        again.prompt_token_ids.push_back(child.token);
        again.max_new_tokens = r.request.params.max_tokens - 1;
        again.priority = static_cast<int32_t>(r.request.params.priority);
        again.cache_salt = r.salt;
        again.stop_token_ids = r.stop_token_ids;
        c->seq = m_.scheduler->add_request(std::move(again));
        m_.by_seq[c->seq] = c;
      }
      children.emplace_back(c, SequenceOutput{c->seq, child.token, reason});
    }
    if (!result.forks[i].empty()) r.forked = true;
    emit_token(s, out.token, out.finish_reason, result.logprobs[i], events);
    for (size_t k = 0; k < children.size(); ++k) {
      emit_token(children[k].first, children[k].second.token, children[k].second.finish_reason,
                 result.forks[i][k].logprobs, events);
    }
  }
}

void Loop::run() {
  at::init_num_threads();
  at::set_num_threads(m_.options.num_threads);
  at::NoGradGuard no_grad;
  std::unique_lock<std::mutex> lock(m_.mu);
  std::vector<PendingEvent> events;
  while (true) {
    m_.wake.wait(lock, [&] {
      return m_.stopping || !m_.pending_cancels.empty() || m_.scheduler->has_unfinished();
    });
    if (!m_.pending_cancels.empty()) {
      process_cancels(events);
      publish_stats();
    }
    if (!m_.scheduler->has_unfinished()) {
      deliver(lock, events);
      if (m_.stopping && m_.pending_cancels.empty()) break;
      continue;
    }
    SchedulerStep step = m_.scheduler->schedule();
    if (step.empty()) {
      deliver(lock, events);
      m_.wake.wait_for(lock, std::chrono::milliseconds(2));
      continue;
    }
    ++m_.steps;
    std::vector<SampleState*> samples(step.sequences.size());
    const Clock::time_point now = Clock::now();
    for (size_t i = 0; i < step.sequences.size(); ++i) {
      samples[i] = m_.by_seq.at(step.sequences[i].seq_id);
      RequestState& r = *samples[i]->request;
      if (!r.scheduled) {
        r.scheduled = true;
        m_.queue_time->observe(seconds(r.submitted, now));
        m_.prompt_tokens += static_cast<int64_t>(r.prompt.size());
        m_.prompt_tokens_total->increment(static_cast<double>(r.prompt.size()));
      }
    }
    for (SequenceId seq : step.preempted) {
      auto it = m_.by_seq.find(seq);
      if (it == m_.by_seq.end()) continue;
      it->second->kv_valid_until = -1;
      it->second->spec_table.clear();
      release_scratch(it->second);
    }
    update_bank(samples);
    lock.unlock();
    StepResult result = execute(step, samples);
    lock.lock();
    apply(step, samples, result, events);

    publish_stats();
    deliver(lock, events);
  }
}

// Under the lock: the scheduler's gauges and prefix-cache counters into the
// metrics, after every step and after cancellations (which free blocks
// without a step when nothing else runs).
void Loop::publish_stats() {
  const SchedulerStats st = m_.scheduler->stats();
  m_.running_gauge->set(static_cast<double>(st.num_running));
  m_.waiting_gauge->set(static_cast<double>(st.num_waiting));
  m_.kv_usage_gauge->set(st.kv_cache_usage);
  m_.prefix_queries->increment(
      static_cast<double>(st.prefix_cache.queries - m_.prefix_seen.queries));
  m_.prefix_hits->increment(static_cast<double>(st.prefix_cache.hits - m_.prefix_seen.hits));
  m_.prefix_seen = st.prefix_cache;
}

}  // namespace

void Engine::Impl::run() {
  try {
    Loop(*this).run();
    if (tp) {
      // Release the other ranks.
      detail::StepMessage stop;
      stop.stop = true;
      detail::broadcast_step(*tp, stop);
    }
  } catch (const std::exception& e) {
    TESSERA_LOG(Error, kLog) << "engine thread stopped: " << e.what();
    if (tp) {
      try {
        detail::StepMessage stop;
        stop.stop = true;
        detail::broadcast_step(*tp, stop);
      } catch (const std::exception&) {
        // The group itself failed: the other ranks see that too.
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    accepting = false;
    for (const auto& [id, r] : requests) {
      std::lock_guard<std::mutex> hl(r->handle->mu);
      r->handle->finished = true;
      r->handle->cv.notify_all();
    }
    requests.clear();
    progress.notify_all();
  }
}

}  // namespace tessera::serve
