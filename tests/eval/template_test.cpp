#include "tessera/eval/template.h"

#include <gtest/gtest.h>

#include "tessera/core/error.h"

namespace tessera::eval {
namespace {

Value doc() {
  return Value::parse_json(R"({
    "question": "  邊個係香港嘅首府？ ",
    "choices": {"text": ["九龍", "香港島", "新界"], "label": ["A", "B", "C"]},
    "answer": "B",
    "n": 3,
    "ratio": 0.5,
    "ok": true,
    "missing": null,
    "tags": ["a", "b"],
    "pairs": [["x", 1], ["y", 2]]
  })");
}

std::string render(const std::string& source, const Value& context = doc()) {
  return Template::compile(source, "t").render(context);
}

// The error message of rendering (or compiling) `source`; "" when it works.
std::string error_of(const std::string& source, const Value& context = doc()) {
  try {
    Template::compile(source, "task.yaml: doc_to_text").render(context);
  } catch (const InvalidArgument& e) {
    return e.message();
  }
  return "";
}

TEST(Template, FieldsAttributesAndIndexes) {
  EXPECT_EQ(render("Q: {{question}}|"), "Q:   邊個係香港嘅首府？ |");
  EXPECT_EQ(render("{{ choices.text[1] }}/{{ choices['label'][0] }}/{{ choices.text[-1] }}"),
            "香港島/A/新界");
  EXPECT_EQ(render("{{ choices.text.0 }}"), "九龍");  // Jinja's dotted index
  EXPECT_EQ(render("{{ n }} {{ ratio }} {{ ok }} {{ missing }}"), "3 0.5 True None");
  EXPECT_EQ(render("{{ tags }}"), "['a', 'b']");
  EXPECT_EQ(render("{{ question[2] }}"), "邊");  // strings index by character
}

TEST(Template, Filters) {
  EXPECT_EQ(render("[{{ question | trim }}]"), "[邊個係香港嘅首府？]");
  EXPECT_EQ(render("{{ 'Mixed Case' | upper }} {{ 'Mixed Case' | lower }}"),
            "MIXED CASE mixed case");
  EXPECT_EQ(render("{{ choices.text | join(', ') }}"), "九龍, 香港島, 新界");
  EXPECT_EQ(render("{{ tags | join }}"), "ab");
  EXPECT_EQ(render("{{ choices.text | length }} {{ 'abc' | length }} {{ '粵語' | length }}"),
            "3 3 2");
  EXPECT_EQ(render("{{ nope | default('x') }} {{ n | default('x') }}"), "x 3");
  EXPECT_EQ(render("{{ tags | first }}{{ tags | last }}"), "ab");
  EXPECT_EQ(render("{{ [1, none, 'a', '', 0] | select | list }}"), "[1, 'a']");
  EXPECT_EQ(render("{{ [1, none, 'a'] | reject | list }}"), "[None]");
  EXPECT_EQ(render("{{ '42' | int + 1 }} {{ 'x' | int }} {{ '2.5' | float }}"), "43 0 2.5");
  EXPECT_EQ(render("{{ 'a-b-c' | replace('-', '+') }}"), "a+b+c");
}

TEST(Template, ForLoopsWithLoopVariables) {
  EXPECT_EQ(render("{% for c in choices.text %}{{ loop.index }}.{{ c }}"
                   "{% if not loop.last %}; {% endif %}{% endfor %}"),
            "1.九龍; 2.香港島; 3.新界");
  EXPECT_EQ(
      render("{% for c in tags %}{{ loop.index0 }}{{ loop.first }}{{ loop.length }}{% endfor %}"),
      "0True21False2");
  EXPECT_EQ(render("{% for k, v in pairs %}{{ k }}={{ v }} {% endfor %}"), "x=1 y=2 ");
  EXPECT_EQ(render("{% for l in choices.label %}{% for t in tags %}{{ l }}{{ t }}{% endfor %}"
                   "{% endfor %}"),
            "AaAbBaBbCaCb");
  // The loop variable shadows the field of the same name and goes away after.
  EXPECT_EQ(render("{% for n in tags %}{{ n }}{% endfor %}{{ n }}"), "ab3");
}

TEST(Template, IfElifElse) {
  const std::string t =
      "{% if answer == 'A' %}first{% elif answer in ['B', 'C'] %}middle{% else %}other{% endif %}";
  EXPECT_EQ(render(t), "middle");
  EXPECT_EQ(render(t, Value::object({{"answer", Value("A")}})), "first");
  EXPECT_EQ(render(t, Value::object({{"answer", Value("Z")}})), "other");
  EXPECT_EQ(render("{% if missing is none %}null{% endif %}"), "null");
  EXPECT_EQ(render("{% if nothing is defined %}yes{% else %}no{% endif %}"), "no");
  EXPECT_EQ(render("{% if n > 2 and not missing %}big{% endif %}"), "big");
  EXPECT_EQ(render("{{ 'yes' if ok else 'no' }}"), "yes");
  EXPECT_EQ(render("{{ 'x' if 'zz' in question else 'y' }}"), "y");
}

TEST(Template, ExpressionsAndMethods) {
  EXPECT_EQ(
      render("{{ n + 2 }} {{ n * 2 - 1 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ 1 / 4 }}"),
      "5 5 3 -4 1 0.25");
  EXPECT_EQ(render("{{ 'a' ~ n ~ ok }}"), "a3True");
  EXPECT_EQ(render("{{ tags + ['c'] }}"), "['a', 'b', 'c']");
  EXPECT_EQ(render("{{ 'x####42'.split('####')[-1] }}|{{ '  p q  '.strip() }}|{{ 'a b'.split() }}"),
            "42|p q|['a', 'b']");
  EXPECT_EQ(render("{{ choices.label.index(answer) }}"), "1");
  EXPECT_EQ(render("{{ choices.get('nope', 'd') }} {{ choices.keys() | list }}"),
            "d ['text', 'label']");
  EXPECT_EQ(render("{{ 'ab'.startswith('a') }} {{ 'ab'.upper() }}"), "True AB");
  EXPECT_EQ(render("{{ \"it's\" }} {{ 'tab\\tnew\\nline' }}"), "it's tab\tnew\nline");
}

TEST(Template, PythonStyleNumbers) {
  EXPECT_EQ(render("{{ 2.0 }} {{ 1e-05 }} {{ 0.0001 }} {{ 1e16 }} {{ 123.25 }} {{ 1e15 }}"),
            "2.0 1e-05 0.0001 1e+16 123.25 1000000000000000.0");
  EXPECT_EQ(python_str(Value(0.1 + 0.2)), "0.30000000000000004");
  EXPECT_EQ(python_str(Value::parse_json(R"({"k": [1, "it's", null]})")),
            "{'k': [1, \"it's\", None]}");
}

TEST(Template, WhitespaceControlAndTrailingNewline) {
  EXPECT_EQ(render("a  {%- if ok -%}  \n  b  {%- endif %}\n"), "ab");
  EXPECT_EQ(render("{% for t in tags -%}\n  {{ t }}\n{%- endfor %}"), "ab");
  EXPECT_EQ(render("x {{- ' y ' -}} z"), "x y z");
  // Jinja drops exactly one trailing newline of the source.
  EXPECT_EQ(render("line\n\n"), "line\n");
  EXPECT_EQ(render("a{# a comment #}b"), "ab");
}

TEST(Template, EvaluateReturnsValues) {
  const Value d = Value::parse_json(R"({"A": "x", "B": "y", "C": "z", "D": null})");
  const Value v = Template::compile("{{ [A, B, C, D] | select | list }}").evaluate(d);
  ASSERT_TRUE(v.is_list());
  ASSERT_EQ(v.as_list().size(), 3u);
  EXPECT_EQ(v.as_list()[2].as_string(), "z");
  EXPECT_TRUE(Template::compile("  {{ 3 }} ").is_single_expression());
  EXPECT_EQ(Template::compile("{{ 3 }}").evaluate(d).as_int(), 3);
  EXPECT_FALSE(Template::compile("n={{ 3 }}").is_single_expression());
  EXPECT_EQ(Template::compile("n={{ 3 }}").evaluate(d).as_string(), "n=3");
}

TEST(Template, UndefinedFieldsAreErrorsWithPosition) {
  EXPECT_EQ(error_of("問題：{{ questoin }}"),
            "task.yaml: doc_to_text: line 1, column 7: undefined field 'questoin'");
  EXPECT_EQ(
      error_of("a\nbb {{ choices.txt }}"),
      "task.yaml: doc_to_text: line 2, column 15: undefined field 'txt' (attribute of a dict)");
  EXPECT_NE(error_of("{{ tags[5] }}").find("undefined index 5 of a list of length 2"),
            std::string::npos);
  EXPECT_NE(
      error_of("{{ missing.x }}").find("undefined attribute 'x' of a value of type 'NoneType'"),
      std::string::npos);
  // StrictUndefined: an undefined value is an error even in a condition.
  EXPECT_NE(error_of("{% if nope %}x{% endif %}").find("undefined field 'nope'"),
            std::string::npos);
}

TEST(Template, SyntaxErrorsHaveLineAndColumn) {
  EXPECT_EQ(error_of("ok\n  {{ question "),
            "task.yaml: doc_to_text: line 2, column 3: unclosed '{{' (missing '}}')");
  EXPECT_EQ(error_of("{% for x in tags %}{{ x }}"),
            "task.yaml: doc_to_text: line 1, column 1: 'for' without matching 'endfor'");
  EXPECT_EQ(error_of("{% if ok %}a"),
            "task.yaml: doc_to_text: line 1, column 1: 'if' without matching 'endif'");
  EXPECT_EQ(error_of("{% if ok %}a{% endfor %}"),
            "task.yaml: doc_to_text: line 1, column 13: unexpected 'endfor' with no open block");
  EXPECT_EQ(error_of("{{ question | shout }}"),
            "task.yaml: doc_to_text: line 1, column 15: unknown filter 'shout'");
  EXPECT_EQ(error_of("{{ a + }}"),
            "task.yaml: doc_to_text: line 1, column 8: expected an expression");
  EXPECT_EQ(error_of("{% while x %}{% endwhile %}"),
            "task.yaml: doc_to_text: line 1, column 1: unsupported statement 'while'");
  EXPECT_EQ(error_of("{% else %}"),
            "task.yaml: doc_to_text: line 1, column 1: unexpected 'else' with no open block");
  EXPECT_EQ(error_of("{{ 'abc }}"),
            "task.yaml: doc_to_text: line 1, column 1: unclosed '{{' (missing '}}')");
  EXPECT_NE(error_of("{{ n is weird }}").find("unknown test 'weird'"), std::string::npos);
}

TEST(Template, TypeErrorsAreReported) {
  EXPECT_NE(error_of("{{ n + 'a' }}").find("unsupported operand types for +: 'int' and 'str'"),
            std::string::npos);
  EXPECT_NE(
      error_of("{% for x in n %}{% endfor %}").find("cannot iterate over a value of type 'int'"),
      std::string::npos);
  EXPECT_NE(error_of("{{ tags.index('zz') }}").find("'zz' is not in list"), std::string::npos);
  EXPECT_NE(error_of("{{ n // 0 }}").find("division or modulo by zero"), std::string::npos);
}

// Regression (the bug fuzz/sim_cluster_fuzz.cpp found in sim's JSON reader,
// present here too): a number too large for a double in a JSON document
// escaped as nlohmann's out_of_range.406 instead of InvalidArgument.
TEST(Value, FuzzNumberTooLargeForADoubleIsInvalidArgument) {
  try {
    Value::parse_json(R"({"answer": 1e999})", "docs.json");
    FAIL() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("docs.json: malformed JSON"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace tessera::eval
