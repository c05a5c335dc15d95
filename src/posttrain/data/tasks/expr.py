"""A small, safe evaluator for + − × ÷ expressions over non-negative integer literals.

Never `eval()`: model output is untrusted. A recursive-descent parser over exact rationals
(`fractions.Fraction`) that accepts only digits, the four operators (ASCII ``+ - * /`` or
``× ÷``), parentheses and spaces. Unary minus is not allowed (Countdown rules: only the
given numbers and the four operations). Length and nesting are bounded so a pathological
completion cannot make the verifier slow or overflow the stack.
"""

from __future__ import annotations

from fractions import Fraction

from posttrain.data.tasks.program import apply

_OP_ALIASES = {"+": "+", "-": "-", "−": "-", "*": "*", "×": "*", "/": "/", "÷": "/"}


class ExpressionError(ValueError):
    """The text is not a well-formed expression (or divides by zero)."""


def tokenize(text: str, max_length: int) -> list[str]:
    """Number, operator (aliases mapped to ASCII) and parenthesis tokens; spaces dropped."""
    if len(text) > max_length:
        raise ExpressionError(f"expression longer than {max_length} characters")
    tokens: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "0123456789":
            j = i
            while j < len(text) and text[j] in "0123456789":
                j += 1
            tokens.append(text[i:j])
            i = j
        elif ch in _OP_ALIASES:
            tokens.append(_OP_ALIASES[ch])
            i += 1
        elif ch in "()":
            tokens.append(ch)
            i += 1
        else:
            raise ExpressionError(f"unexpected character {ch!r}")
    return tokens


class _Parser:
    """Recursive descent: expr := term ((+|-) term)*; term := factor ((*|/) factor)*;
    factor := NUMBER | ( expr ). Records the literals it reads."""

    def __init__(self, tokens: list[str], max_depth: int):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.max_depth = max_depth
        self.literals: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("unexpected end of expression")
        self.pos += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            value = apply(value, op, self.term())
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor()
            if op == "/" and rhs == 0:
                raise ExpressionError("division by zero")
            value = apply(value, op, rhs)
        return value

    def factor(self) -> Fraction:
        token = self.take()
        if token == "(":
            self.depth += 1
            if self.depth > self.max_depth:
                raise ExpressionError(f"parentheses nested deeper than {self.max_depth}")
            value = self.expr()
            if self.take() != ")":
                raise ExpressionError("missing ')'")
            self.depth -= 1
            return value
        if token.isdigit():
            self.literals.append(int(token))
            return Fraction(int(token))
        raise ExpressionError(f"unexpected {token!r}")


def evaluate_expression(
    text: str, *, max_length: int = 200, max_depth: int = 16
) -> tuple[Fraction, list[int]]:
    """Value of `text` and the integer literals it uses, in order.

    max_length: longest accepted input in characters (bounds the work per call).
    max_depth: deepest accepted parenthesis nesting (bounds recursion).
    Raises ExpressionError for anything else: unknown characters, unbalanced parentheses,
    a dangling operator, unary minus, division by zero.
    """
    tokens = tokenize(text, max_length)
    if not tokens:
        raise ExpressionError("empty expression")
    parser = _Parser(tokens, max_depth)
    value = parser.expr()
    if parser.pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[parser.pos]!r}")
    return value, parser.literals
