//! SQL text both stores write the same way: quoted identifiers and string literals, and an
//! owner rule as a `CASE` expression. The dialects differ only in how a text prefix is cut and
//! whether a value's type must be checked at run time; callers supply those parts.
use crate::config::OwnerRule;

/// An identifier, double-quoted.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A string literal, single-quoted.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The region `rule` gives the key value `v` (an SQL expression); NULL for none. Agrees with
/// `resolve::ownership::rule_owner`. `prefix_of(v, sep)` is the dialect's SQL for the text
/// before the first `sep` in `v` (NULL if there is none or `v` is not text); `integer`, if
/// given, the condition that `v` is an integer (where the column's type does not say so).
pub fn rule_case(
    rule: &OwnerRule,
    v: &str,
    prefix_of: impl Fn(&str, &str) -> String,
    integer: Option<String>,
) -> String {
    if let Some(separator) = &rule.prefix {
        let prefix = prefix_of(v, &literal(separator));
        if rule.regions.is_empty() {
            return prefix;
        }
        let arms: String = rule
            .regions
            .iter()
            .map(|(p, r)| format!(" WHEN {} THEN {}", literal(p), literal(r)))
            .collect();
        return format!("CASE {prefix}{arms} END");
    }
    let arms: String = rule
        .ranges
        .iter()
        .map(|r| format!(" WHEN {v} BETWEEN {} AND {} THEN {}", r.from, r.to, literal(&r.region)))
        .collect();
    match integer {
        Some(condition) => format!("CASE WHEN {condition} THEN CASE{arms} END END"),
        None => format!("CASE{arms} END"),
    }
}
