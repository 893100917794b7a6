//! Character error rate, the metric for Mandarin (no word boundaries).

/// Characters that count: letters, digits and CJK ideographs, lowercased. Punctuation and
/// whitespace are left out, as the usual Mandarin CER normalisation does.
pub fn normalize_for_cer(text: &str) -> Vec<char> {
    text.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Levenshtein distance between two character sequences.
pub fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// Corpus CER: total edits over total reference characters (after normalisation).
pub fn cer<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    let (mut edits, mut chars) = (0usize, 0usize);
    for (hypothesis, reference) in pairs {
        let reference = normalize_for_cer(reference);
        edits += edit_distance(&normalize_for_cer(hypothesis), &reference);
        chars += reference.len();
    }
    if chars == 0 {
        0.0
    } else {
        edits as f64 / chars as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_character_edits() {
        assert_eq!(cer([("火车快到站了", "火车快到站了。")]), 0.0);
        assert!((cer([("火车到站了", "火车快到站了")]) - 1.0 / 6.0).abs() < 1e-12);
        assert!((cer([("获得快到善良", "火车快到站了")]) - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(edit_distance(&['a', 'b'], &[]), 2);
    }
}
