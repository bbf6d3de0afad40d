// tessera/eval/template.h — the Jinja subset that evaluation task files use.
//
// Task files (lm-evaluation-harness style) write prompts as Jinja templates
// over a document's fields. This is a self-contained implementation of the
// part of Jinja2 those templates need, with Jinja2's StrictUndefined
// behaviour: using a field the document does not have is an error, never an
// empty string.
//
//   auto t = Template::compile("問題：{{ question | trim }}\n"
//                              "{% for c in choices %}{{ loop.index }}. {{ c }}\n{% endfor %}",
//                              "arc.yaml:doc_to_text");
//   std::string prompt = t.render(doc);
//
// Supported:
//   {{ expr }}, {% if %}/{% elif %}/{% else %}/{% endif %},
//   {% for x in xs %}...{% endfor %} (also "for a, b in pairs") with
//   loop.index, loop.index0, loop.first, loop.last, loop.length, loop.revindex;
//   {# comments #}; whitespace control {%- -%} {{- -}}; a single trailing
//   newline of the source is dropped (Jinja's keep_trailing_newline=False).
//   Expressions: field, field.sub, list[0], list[-1], obj['key'], string /
//   int / float / true / false / none literals, [list literals], parentheses,
//   + - * / // %, ~ (string concatenation), == != < <= > >=, in / not in,
//   and / or / not, "a if cond else b", tests "is [not] defined|undefined|none|
//   string|number|integer|boolean|mapping|sequence".
//   Filters: trim, upper, lower, join(sep), default(v) / d(v), length / count,
//   first, last, list, select, reject, string, int, float, replace(a, b),
//   capitalize, title.
//   Methods: str.strip/lstrip/rstrip/split/upper/lower/replace/startswith/
//   endswith, list.index/count, dict.get/keys/values/items.
// Values print as Python's str() does (None, True, 1.5, ['a', 'b']).
//
// Errors are tessera::InvalidArgument whose message names the template and the
// 1-based line and column (in characters) of the offending token:
//   "arc.yaml:doc_to_text: line 1, column 6: undefined field 'questoin'".
//
// A compiled Template is immutable; render() and evaluate() are const and
// safe to call from many threads at once. Copies share the compiled form.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "tessera/eval/value.h"

namespace tessera::eval {

class Template {
 public:
  // Parses `source`. InvalidArgument with line/column on a syntax error
  // (unclosed tag, unknown filter, missing endfor, bad expression).
  static Template compile(std::string_view source, std::string name = "<template>");

  // Renders with `context` (an object whose fields are the template's
  // variables). InvalidArgument on undefined fields, type errors and the like.
  std::string render(const Value& context) const;

  // When the template is exactly one {{ expr }} (surrounding whitespace
  // allowed) returns the expression's value (e.g. a list for doc_to_choice);
  // otherwise returns render() as a string Value.
  Value evaluate(const Value& context) const;

  bool is_single_expression() const;
  const std::string& name() const;
  const std::string& source() const;

 private:
  struct Impl;
  explicit Template(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

// Python's str() of a value: strings as is, None, True/False, ints, floats in
// repr form ("2.0", "1e-05"), lists and dicts with repr'd elements.
std::string python_str(const Value& value);

}  // namespace tessera::eval
