"""The few things the two engines cannot say alike, and PostgreSQL's spelling of our SQL.

Statements are written once, with `?` (or `:name`) placeholders, in SQL both engines run;
`postgres_sql` turns the placeholders into psycopg's once per statement, `numbered_sql` into the
server's own (`$1`), for psycopg's RawCursor.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str  # "sqlite" or "postgresql"
    rowid: str  # a row's physical address, for deleting a few rows at a time from a table without a key

    def local_day(self, column: str) -> str:
        """The local calendar day (YYYY-MM-DD) of a Unix timestamp column."""
        if self.name == "sqlite":
            return f"date({column}, 'unixepoch', 'localtime')"
        return f"to_char(to_timestamp({column}), 'YYYY-MM-DD')"

    def group_concat(self, expression: str) -> str:
        """The distinct values of `expression` joined by commas."""
        if self.name == "sqlite":
            return f"GROUP_CONCAT(DISTINCT {expression})"
        return f"string_agg(DISTINCT {expression}, ',')"


SQLITE = Dialect("sqlite", "rowid")
POSTGRES = Dialect("postgresql", "ctid")


@lru_cache(maxsize=4096)
def postgres_sql(sql: str) -> str:
    """`?` and `:name` placeholders as `%s` and `%(name)s`, a literal `%` doubled; quoted text, quoted
    names, comments and `::` casts are left as they are."""
    return _placeholders(sql, numbered=False)


def numbered_sql(sql: str) -> str:
    """`?` placeholders as `$1`, `$2`, ...: what the server reads, which psycopg's RawCursor sends as it
    is. psycopg parses any other statement of over 50 parameters or 4 KB again at each execution."""
    return _placeholders(sql, numbered=True)


def _placeholders(sql: str, *, numbered: bool) -> str:
    percent = "%" if numbered else "%%"
    count = 0
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"":
            end = i + 1
            while end < n:
                if sql[end] == c:
                    if end + 1 < n and sql[end + 1] == c:  # a doubled quote inside
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[i : end + 1].replace("%", percent))
            i = end + 1
        elif c == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end].replace("%", percent))
            i = end
        elif c == "?":
            count += 1
            out.append(f"${count}" if numbered else "%s")
            i += 1
        elif c == "%":
            out.append(percent)
            i += 1
        elif c == ":" and sql.startswith("::", i):
            out.append("::")
            i += 2
        elif c == ":" and i + 1 < n and (sql[i + 1].isalpha() or sql[i + 1] == "_") and not numbered:
            end = i + 1
            while end < n and (sql[end].isalnum() or sql[end] == "_"):
                end += 1
            out.append(f"%({sql[i + 1 : end]})s")
            i = end
        else:
            out.append(c)
            i += 1
    return "".join(out)
