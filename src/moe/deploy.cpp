#include "tessera/moe/deploy.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::moe {

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();

// The shipped price sheet (data/aws_lambda_prices.json, kept identical by
// the moe test).
constexpr const char* kAwsLambda = R"json({
  "name": "AWS Lambda, x86, us-east-1 (2024 price sheet)",
  "gb_second": 0.0000166667,
  "per_request": 0.0000002,
  "billing_granularity_ms": 1,
  "minimum_billed_ms": 1,
  "memory_sizes_mb": [128, 256, 384, 512, 640, 768, 1024, 1280, 1536, 1792, 2048, 2304, 2560, 3072],
  "memory_mb_per_vcpu": 1769,
  "payload_limit_bytes": 6291456,
  "cpu_cluster_name": "2 x 64-core EPYC on demand (c6a.32xlarge)",
  "cpu_cluster_per_hour": 4.896
})json";
}  // namespace

PriceSheet PriceSheet::from_json(const std::string& text, const std::string& source) {
  ConfigObject c = ConfigObject::parse(text, source);
  PriceSheet p;
  p.name = c.get_string("name");
  p.gb_second = c.get_double("gb_second");
  p.per_request = c.get_double("per_request");
  p.billing_granularity_ms = c.get_double("billing_granularity_ms", 1);
  p.minimum_billed_ms = c.get_double("minimum_billed_ms", 1);
  p.memory_sizes_mb = c.get_int_list("memory_sizes_mb");
  p.memory_mb_per_vcpu = c.get_double("memory_mb_per_vcpu", 1769);
  p.payload_limit_bytes = c.get_int("payload_limit_bytes", 6 << 20);
  p.cpu_cluster_name = c.get_string("cpu_cluster_name", "");
  p.cpu_cluster_per_hour = c.get_double("cpu_cluster_per_hour", 0);
  c.check_no_unknown_keys();
  TESSERA_CHECK(p.gb_second > 0 && p.per_request >= 0 && p.billing_granularity_ms > 0 &&
                    !p.memory_sizes_mb.empty(),
                InvalidArgument, source, ": prices must be positive and memory sizes given");
  return p;
}

PriceSheet PriceSheet::from_json_file(const std::string& path) {
  return from_json(ConfigObject::load_file(path).dump(), path);
}

PriceSheet PriceSheet::aws_lambda() { return from_json(kAwsLambda, "aws_lambda_prices.json"); }

double PriceSheet::billed_seconds(double seconds) const {
  const double ms = std::max(seconds * 1e3, minimum_billed_ms);
  // Round up to the granularity, with a relative tolerance for values that
  // are whole multiples up to floating-point noise (an absolute one would
  // round a run far shorter than one unit down to nothing).
  const double units = std::ceil(ms / billing_granularity_ms * (1 - 1e-12));
  return units * billing_granularity_ms / 1e3;
}

double PriceSheet::invocation_cost(int64_t memory_mb, double seconds) const {
  return billed_seconds(seconds) * (static_cast<double>(memory_mb) / 1024.0) * gb_second +
         per_request;
}

double BillingMeter::record(const std::string& function, int64_t memory_mb, double seconds) {
  TESSERA_CHECK(memory_mb > 0 && seconds >= 0, InvalidArgument, "BillingMeter: bad invocation of ",
                function);
  Invocation i{function, memory_mb, seconds, prices_.billed_seconds(seconds), 0};
  i.cost = prices_.invocation_cost(memory_mb, seconds);
  gb_seconds_ += i.billed_seconds * static_cast<double>(memory_mb) / 1024.0;
  total_ += i.cost;
  invocations_.push_back(i);
  return i.cost;
}

const char* method_name(Method m) {
  switch (m) {
    case Method::kPipelined:
      return "pipelined";
    case Method::kIndirect:
      return "indirect";
    case Method::kDirect:
      return "direct";
  }
  return "?";
}

double replica_seconds(const PlatformProfile& p, const PriceSheet& prices,
                       const ReplicaWork& work) {
  const Method method = work.method;
  const int memory_index = work.memory_index;
  const int64_t tokens = work.tokens, beta = work.beta;
  if (tokens <= 0) return 0;
  const double mem_bytes = static_cast<double>(p.memory_mb.at(memory_index)) * (1 << 20);
  const double t_cal = p.t_cal.at(memory_index);
  const double din = static_cast<double>(p.input_bytes_per_token),
               dout = static_cast<double>(p.output_bytes_per_token);
  const int64_t held = method == Method::kPipelined ? std::min(beta, tokens) : tokens;
  const double need = static_cast<double>(p.expert_weight_bytes + p.runtime_overhead_bytes) +
                      static_cast<double>(held) *
                          (static_cast<double>(p.intermediate_bytes_per_token) + din + dout);
  if (need > mem_bytes) return kInf;
  const double r = static_cast<double>(tokens);
  switch (method) {
    case Method::kPipelined: {
      if (beta <= 0) return kInf;
      const double b = static_cast<double>(std::min(beta, tokens));
      const double a = p.t_dl + b * din / p.storage_bandwidth;
      const double c = b * t_cal;
      const double u = p.t_dl + b * dout / p.storage_bandwidth;
      const double blocks = std::ceil(r / b);
      return p.t_head + a + c + u + (blocks - 1) * std::max({a, c, u});
    }
    case Method::kIndirect:
      return p.t_head + 2 * p.t_dl + r * ((din + dout) / p.storage_bandwidth + t_cal);
    case Method::kDirect:
      if (r * din > static_cast<double>(prices.payload_limit_bytes)) return kInf;
      return p.t_head + r * (dout / p.call_bandwidth + t_cal);
  }
  return kInf;
}

ExpertCost expert_cost(const PlatformProfile& p, const PriceSheet& prices, const ExpertWork& work) {
  const Method method = work.method;
  const int64_t beta = work.beta;
  const ExpertChoice& choice = work.choice;
  const double tokens = work.tokens;
  ExpertCost out;
  if (tokens <= 0) return out;
  const int64_t per = static_cast<int64_t>(std::ceil(tokens / choice.replicas));
  out.seconds = replica_seconds(p, prices, {method, choice.memory_index, per, beta});
  if (!std::isfinite(out.seconds)) {
    out.feasible = false;
    out.cost = kInf;
    return out;
  }
  out.cost =
      choice.replicas * prices.invocation_cost(p.memory_mb[choice.memory_index], out.seconds);
  return out;
}

namespace {

struct Option {
  ExpertChoice choice;
  double seconds, cost;
};

// Feasible options of one expert, sorted by time, with the running minimum
// cost (best option no slower than each time).
struct ExpertOptions {
  std::vector<Option> by_time;
  std::vector<int> best_upto;  // index of the cheapest among by_time[0..i]
};

std::vector<ExpertChoice> choices(const PlatformProfile& p, const SearchSpace& s) {
  std::vector<ExpertChoice> out;
  for (int m = 0; m < static_cast<int>(p.memory_mb.size()); ++m) {
    if (s.fixed_memory_index >= 0 && m != s.fixed_memory_index) continue;
    for (int n = 1; n <= (s.allow_replicas ? s.max_replicas : 1); ++n) out.push_back({m, n});
  }
  return out;
}

ExpertOptions expert_options(const PlatformProfile& p, const PriceSheet& prices, Method method,
                             int64_t beta, double tokens, const std::vector<ExpertChoice>& all) {
  ExpertOptions o;
  if (tokens <= 0) {
    o.by_time.push_back({{0, 0}, 0, 0});
  } else {
    for (const ExpertChoice& c : all) {
      ExpertCost ec = expert_cost(p, prices, {method, beta, c, tokens});
      if (ec.feasible) o.by_time.push_back({c, ec.seconds, ec.cost});
    }
    std::sort(o.by_time.begin(), o.by_time.end(), [](const Option& a, const Option& b) {
      return a.seconds < b.seconds || (a.seconds == b.seconds && a.cost < b.cost);
    });
  }
  for (size_t i = 0; i < o.by_time.size(); ++i) {
    const int prev = i ? o.best_upto[i - 1] : -1;
    o.best_upto.push_back(
        prev >= 0 && o.by_time[prev].cost <= o.by_time[i].cost ? prev : static_cast<int>(i));
  }
  return o;
}

std::vector<int64_t> betas_for(Method m, const SearchSpace& s) {
  return m == Method::kPipelined ? s.betas : std::vector<int64_t>{0};
}

// The Pareto front of one layer: for each achievable layer time, the
// cheapest plan no slower than it.
std::vector<LayerPlan> layer_front(const PlatformProfile& p, const PriceSheet& prices,
                                   const std::vector<double>& loads, const SearchSpace& s) {
  std::vector<LayerPlan> points;
  const std::vector<ExpertChoice> all = choices(p, s);
  for (Method m : s.methods) {
    for (int64_t beta : betas_for(m, s)) {
      std::vector<ExpertOptions> opts;
      bool possible = true;
      std::vector<double> times;
      for (double t : loads) {
        opts.push_back(expert_options(p, prices, m, beta, t, all));
        if (opts.back().by_time.empty()) possible = false;
        for (const Option& o : opts.back().by_time) times.push_back(o.seconds);
      }
      if (!possible) continue;
      std::sort(times.begin(), times.end());
      times.erase(std::unique(times.begin(), times.end()), times.end());
      for (double T : times) {
        LayerPlan plan;
        plan.method = m;
        plan.beta = beta;
        bool ok = true;
        for (const ExpertOptions& eo : opts) {
          // Last option with time <= T.
          auto it = std::upper_bound(eo.by_time.begin(), eo.by_time.end(), T,
                                     [](double v, const Option& o) { return v < o.seconds; });
          if (it == eo.by_time.begin()) {
            ok = false;
            break;
          }
          const Option& best = eo.by_time[eo.best_upto[(it - eo.by_time.begin()) - 1]];
          plan.experts.push_back(best.choice);
          plan.seconds = std::max(plan.seconds, best.seconds);
          plan.cost += best.cost;
        }
        if (ok) points.push_back(std::move(plan));
      }
    }
  }
  std::sort(points.begin(), points.end(), [](const LayerPlan& a, const LayerPlan& b) {
    return a.seconds < b.seconds || (a.seconds == b.seconds && a.cost < b.cost);
  });
  std::vector<LayerPlan> front;
  for (LayerPlan& pl : points) {
    if (front.empty() || pl.cost < front.back().cost) front.push_back(std::move(pl));
  }
  return front;
}

struct Merged {
  double seconds, cost;
  int prev;   // index into the previous merged front
  int point;  // index into this layer's front
};

void check_loads(const PlatformProfile& p, const std::vector<std::vector<double>>& loads) {
  TESSERA_CHECK(!loads.empty() && p.memory_mb.size() == p.t_cal.size() && !p.memory_mb.empty(),
                InvalidArgument,
                "deployment: need loads for at least one layer and t_cal for every memory size");
}

}  // namespace

Deployment evaluate(const PlatformProfile& p, const PriceSheet& prices, const Deployment& plan,
                    const std::vector<std::vector<double>>& loads) {
  TESSERA_CHECK(plan.layers.size() == loads.size(), InvalidArgument, "evaluate: plan for ",
                plan.layers.size(), " layers, loads for ", loads.size());
  Deployment out = plan;
  out.seconds = out.cost = 0;
  out.feasible = true;
  for (size_t l = 0; l < loads.size(); ++l) {
    LayerPlan& lp = out.layers[l];
    TESSERA_CHECK(lp.experts.size() == loads[l].size(), InvalidArgument, "evaluate: layer ", l,
                  " plans ", lp.experts.size(), " experts, loads for ", loads[l].size());
    lp.seconds = lp.cost = 0;
    for (size_t e = 0; e < loads[l].size(); ++e) {
      ExpertCost ec = expert_cost(p, prices, {lp.method, lp.beta, lp.experts[e], loads[l][e]});
      if (!ec.feasible) out.feasible = false;
      lp.seconds = std::max(lp.seconds, ec.seconds);
      lp.cost += ec.cost;
    }
    out.seconds += lp.seconds;
    out.cost += lp.cost;
  }
  return out;
}

Deployment optimal_deployment(const PlatformProfile& p, const PriceSheet& prices,
                              const std::vector<std::vector<double>>& loads, double slo_seconds,
                              const SearchSpace& space) {
  check_loads(p, loads);
  std::vector<std::vector<LayerPlan>> fronts;
  for (const auto& layer : loads) {
    fronts.push_back(layer_front(p, prices, layer, space));
    TESSERA_CHECK(!fronts.back().empty(), InvalidArgument, "deployment: layer ", fronts.size() - 1,
                  " has no feasible option (memory or payload limits too small)");
  }
  // Merge the fronts layer by layer, keeping Pareto-optimal (time, cost).
  std::vector<std::vector<Merged>> merged(fronts.size());
  for (size_t l = 0; l < fronts.size(); ++l) {
    std::vector<Merged> all;
    if (l == 0) {
      for (size_t i = 0; i < fronts[0].size(); ++i)
        all.push_back({fronts[0][i].seconds, fronts[0][i].cost, -1, int(i)});
    } else {
      for (size_t a = 0; a < merged[l - 1].size(); ++a) {
        for (size_t b = 0; b < fronts[l].size(); ++b) {
          all.push_back({merged[l - 1][a].seconds + fronts[l][b].seconds,
                         merged[l - 1][a].cost + fronts[l][b].cost, int(a), int(b)});
        }
      }
    }
    std::sort(all.begin(), all.end(), [](const Merged& x, const Merged& y) {
      return x.seconds < y.seconds || (x.seconds == y.seconds && x.cost < y.cost);
    });
    for (const Merged& m : all) {
      if (merged[l].empty() || m.cost < merged[l].back().cost) merged[l].push_back(m);
    }
  }
  const auto& last = merged.back();
  int pick = -1;
  for (int i = 0; i < static_cast<int>(last.size()); ++i) {
    if (last[i].seconds <= slo_seconds && (pick < 0 || last[i].cost < last[pick].cost)) pick = i;
  }
  Deployment d;
  d.feasible = pick >= 0;
  if (pick < 0) pick = 0;  // the fastest
  d.layers.resize(fronts.size());
  for (int l = static_cast<int>(fronts.size()) - 1, i = pick; l >= 0; --l) {
    d.layers[l] = fronts[l][merged[l][i].point];
    i = merged[l][i].prev;
  }
  const Deployment e = evaluate(p, prices, d, loads);
  d.seconds = e.seconds;
  d.cost = e.cost;
  return d;
}

Deployment brute_force_deployment(const PlatformProfile& p, const PriceSheet& prices,
                                  const std::vector<std::vector<double>>& loads, double slo_seconds,
                                  const SearchSpace& space) {
  check_loads(p, loads);
  const std::vector<ExpertChoice> all = choices(p, space);
  // Every plan of every layer.
  std::vector<std::vector<LayerPlan>> plans(loads.size());
  for (size_t l = 0; l < loads.size(); ++l) {
    for (Method m : space.methods) {
      for (int64_t beta : betas_for(m, space)) {
        const size_t E = loads[l].size();
        std::vector<size_t> idx(E, 0);
        while (true) {
          LayerPlan plan;
          plan.method = m;
          plan.beta = beta;
          bool ok = true;
          for (size_t e = 0; e < E; ++e) {
            ExpertChoice c = all[idx[e]];
            ExpertCost ec = expert_cost(p, prices, {m, beta, c, loads[l][e]});
            if (!ec.feasible) ok = false;
            plan.experts.push_back(c);
            plan.seconds = std::max(plan.seconds, ec.seconds);
            plan.cost += ec.cost;
          }
          if (ok) plans[l].push_back(plan);
          size_t e = 0;
          while (e < E && ++idx[e] == all.size()) idx[e++] = 0;
          if (e == E) break;
        }
      }
    }
  }
  Deployment best;
  double best_cost = kInf, fastest = kInf;
  Deployment fastest_plan;
  std::vector<size_t> idx(loads.size(), 0);
  for (const auto& pl : plans) {
    if (pl.empty()) return best;
  }
  while (true) {
    double t = 0, c = 0;
    for (size_t l = 0; l < loads.size(); ++l) {
      t += plans[l][idx[l]].seconds;
      c += plans[l][idx[l]].cost;
    }
    auto take = [&](Deployment& d) {
      d.layers.clear();
      for (size_t l = 0; l < loads.size(); ++l) d.layers.push_back(plans[l][idx[l]]);
      d.seconds = t;
      d.cost = c;
    };
    if (t <= slo_seconds && c < best_cost) {
      best_cost = c;
      take(best);
      best.feasible = true;
    }
    if (t < fastest) {
      fastest = t;
      take(fastest_plan);
    }
    size_t l = 0;
    while (l < loads.size() && ++idx[l] == plans[l].size()) idx[l++] = 0;
    if (l == loads.size()) break;
  }
  return best.feasible ? best : fastest_plan;
}

Deployment repair_deployment(const PlatformProfile& p, const PriceSheet& prices,
                             const std::vector<std::vector<double>>& loads, double slo_seconds,
                             const SearchSpace& space) {
  check_loads(p, loads);
  std::vector<std::vector<LayerPlan>> fronts;
  std::vector<int> at;
  for (const auto& layer : loads) {
    fronts.push_back(layer_front(p, prices, layer, space));
    TESSERA_CHECK(!fronts.back().empty(), InvalidArgument,
                  "deployment: a layer has no feasible option");
    at.push_back(static_cast<int>(fronts.back().size()) - 1);  // the cheapest point is the slowest
  }
  auto total = [&] {
    double t = 0;
    for (size_t l = 0; l < fronts.size(); ++l) t += fronts[l][at[l]].seconds;
    return t;
  };
  const int max_rounds = static_cast<int>(2 * loads.front().size() * fronts.size());
  for (int round = 0; round < max_rounds && total() > slo_seconds; ++round) {
    int slowest = -1;
    for (size_t l = 0; l < fronts.size(); ++l) {
      if (at[l] > 0 &&
          (slowest < 0 || fronts[l][at[l]].seconds > fronts[slowest][at[slowest]].seconds))
        slowest = int(l);
    }
    if (slowest < 0) break;
    --at[slowest];
  }
  Deployment d;
  for (size_t l = 0; l < fronts.size(); ++l) d.layers.push_back(fronts[l][at[l]]);
  Deployment e = evaluate(p, prices, d, loads);
  e.feasible = e.feasible && e.seconds <= slo_seconds;
  return e;
}

double cpu_cluster_cost(const PriceSheet& prices, double token_layers,
                        double cluster_tokens_per_second) {
  TESSERA_CHECK(cluster_tokens_per_second > 0, InvalidArgument,
                "cpu_cluster_cost: throughput must be positive");
  return token_layers / cluster_tokens_per_second / 3600.0 * prices.cpu_cluster_per_hour;
}

}  // namespace tessera::moe
