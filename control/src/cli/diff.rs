//! A small line diff (longest common subsequence) rendered as unified-diff
//! style hunks with `-`/`+` prefixes.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Equal,
    Delete,
    Insert,
}

/// Line operations turning `a` into `b`, in order.
pub fn line_ops<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<(Op, &'a str)> {
    // Common prefix and suffix first: edits are usually local, and this
    // keeps the quadratic part small.
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    let mut ops: Vec<(Op, &str)> = a[..prefix].iter().map(|l| (Op::Equal, *l)).collect();
    let (n, m) = (am.len(), bm.len());
    if n.saturating_mul(m) > 16_000_000 {
        // Too big to align line by line: replace the middle wholesale.
        ops.extend(am.iter().map(|l| (Op::Delete, *l)));
        ops.extend(bm.iter().map(|l| (Op::Insert, *l)));
    } else {
        // lcs[i][j]: LCS length of am[i..] and bm[j..].
        let w = m + 1;
        let mut lcs = vec![0u32; (n + 1) * w];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                lcs[i * w + j] = if am[i] == bm[j] {
                    lcs[(i + 1) * w + j + 1] + 1
                } else {
                    lcs[(i + 1) * w + j].max(lcs[i * w + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n && j < m {
            if am[i] == bm[j] {
                ops.push((Op::Equal, am[i]));
                i += 1;
                j += 1;
            } else if lcs[(i + 1) * w + j] >= lcs[i * w + j + 1] {
                ops.push((Op::Delete, am[i]));
                i += 1;
            } else {
                ops.push((Op::Insert, bm[j]));
                j += 1;
            }
        }
        ops.extend(am[i..].iter().map(|l| (Op::Delete, *l)));
        ops.extend(bm[j..].iter().map(|l| (Op::Insert, *l)));
    }
    ops.extend(a[a.len() - suffix..].iter().map(|l| (Op::Equal, *l)));
    ops
}

/// Unified-style hunks (`@@ -a,b +c,d @@`, then ` `/`-`/`+` lines) with
/// `context` unchanged lines around each change. Empty when equal.
pub fn unified(before: &str, after: &str, context: usize) -> Vec<String> {
    let a: Vec<&str> = before.lines().collect();
    let b: Vec<&str> = after.lines().collect();
    let ops = line_ops(&a, &b);
    // Which ops to show: changes and their context.
    let mut show = vec![false; ops.len()];
    for (k, (op, _)) in ops.iter().enumerate() {
        if *op != Op::Equal {
            let lo = k.saturating_sub(context);
            let hi = (k + context + 1).min(ops.len());
            show[lo..hi].iter_mut().for_each(|s| *s = true);
        }
    }
    let mut out = Vec::new();
    let (mut ai, mut bi) = (0usize, 0usize); // lines consumed so far
    let mut k = 0;
    while k < ops.len() {
        if !show[k] {
            match ops[k].0 {
                Op::Equal => {
                    ai += 1;
                    bi += 1;
                }
                Op::Delete => ai += 1,
                Op::Insert => bi += 1,
            }
            k += 1;
            continue;
        }
        let end = (k..ops.len()).find(|&e| !show[e]).unwrap_or(ops.len());
        let hunk = &ops[k..end];
        let a_len = hunk.iter().filter(|(o, _)| *o != Op::Insert).count();
        let b_len = hunk.iter().filter(|(o, _)| *o != Op::Delete).count();
        let start = |pos: usize, len: usize| if len == 0 { pos } else { pos + 1 };
        out.push(format!(
            "@@ -{},{a_len} +{},{b_len} @@",
            start(ai, a_len),
            start(bi, b_len)
        ));
        for (op, line) in hunk {
            let p = match op {
                Op::Equal => ' ',
                Op::Delete => '-',
                Op::Insert => '+',
            };
            out.push(format!("{p}{line}"));
        }
        ai += a_len;
        bi += b_len;
        k = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_have_no_hunks() {
        assert!(unified("a\nb\n", "a\nb\n", 3).is_empty());
    }

    #[test]
    fn one_changed_line() {
        let before = "1\n2\n3\n4\n5\n6\n7\n8\n9\n";
        let after = "1\n2\n3\n4\nfive\n6\n7\n8\n9\n";
        assert_eq!(
            unified(before, after, 2),
            vec!["@@ -3,5 +3,5 @@", " 3", " 4", "-5", "+five", " 6", " 7"]
        );
    }

    #[test]
    fn insertions_and_deletions() {
        let ops = line_ops(&["a", "b", "c"], &["a", "x", "c", "d"]);
        assert_eq!(
            ops,
            vec![
                (Op::Equal, "a"),
                (Op::Delete, "b"),
                (Op::Insert, "x"),
                (Op::Equal, "c"),
                (Op::Insert, "d"),
            ]
        );
        assert_eq!(
            unified("", "a\nb\n", 3),
            vec!["@@ -0,0 +1,2 @@", "+a", "+b"]
        );
    }

    #[test]
    fn separate_hunks() {
        let before: String = (1..=20).map(|i| format!("{i}\n")).collect();
        let after = before.replace("2\n", "two\n").replace("19\n", "nineteen\n");
        let h = unified(&before, &after, 1);
        assert_eq!(h[0], "@@ -1,3 +1,3 @@");
        assert!(h.contains(&"@@ -18,3 +18,3 @@".to_string()), "{h:?}");
    }
}
