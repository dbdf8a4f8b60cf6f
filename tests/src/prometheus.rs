//! Reading lb-control's `/metrics` (Prometheus text format) the way a scraper does: the samples
//! of one metric, each with its labels.

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    /// What is between the braces (empty for a metric without labels).
    pub labels: &'a str,
    pub value: f64,
}

impl<'a> Sample<'a> {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&'a str> {
        let start = self
            .labels
            .split(',')
            .find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix("=\""))?;
        start.strip_suffix('"').or(Some(start))
    }
}

/// The samples of metric `name` (the full sample name, e.g. `lb_backend_transitions_total`)
/// in `text`; comments and other metrics are skipped.
pub fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = Sample<'a>> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(labelled) => labelled.rsplit_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        Some(Sample {
            labels,
            value: value.trim().parse().ok()?,
        })
    })
}

/// The sum of every sample of `name` whose labels pass `filter`.
pub fn sum<'a>(text: &'a str, name: &'a str, filter: impl Fn(&Sample<'a>) -> bool) -> f64 {
    samples(text, name)
        .filter(|sample| filter(sample))
        .map(|sample| sample.value)
        .sum()
}

/// A histogram's cumulative bucket counts (`<name>_bucket{le="…"}`), by upper bound,
/// ascending (`+Inf` last).
pub fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut found: Vec<(f64, f64)> = samples(text, &bucket)
        .filter_map(|sample| {
            let bound = match sample.label("le")? {
                "+Inf" => f64::INFINITY,
                bound => bound.parse().ok()?,
            };
            Some((bound, sample.value))
        })
        .collect();
    found.sort_by(|a, b| a.0.total_cmp(&b.0));
    found
}

/// The `q` quantile (0 to 1) of what a histogram counted between two scrapes of its
/// [`buckets`], estimated as Prometheus's `histogram_quantile` does: linearly within the bucket
/// it falls in (from 0 for the first), the highest finite bound when it falls beyond it. None
/// when nothing was counted in between.
pub fn quantile_between(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let counted: Vec<(f64, f64)> = after
        .iter()
        .map(|&(bound, count)| {
            let earlier = before
                .iter()
                .find(|(known, _)| *known == bound)
                .map_or(0.0, |(_, count)| *count);
            (bound, count - earlier)
        })
        .collect();
    let total = counted.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in &counted {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let share = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_what_a_histogram_counted_between_two_scrapes() {
        let scrape = |counts: [u32; 4]| {
            format!(
                "d_seconds_bucket{{le=\"0.01\"}} {}\n\
                 d_seconds_bucket{{le=\"0.1\"}} {}\n\
                 d_seconds_bucket{{le=\"1\"}} {}\n\
                 d_seconds_bucket{{le=\"+Inf\"}} {}\n\
                 d_seconds_count {}\n",
                counts[0], counts[1], counts[2], counts[3], counts[3]
            )
        };
        let before = buckets(&scrape([5, 5, 5, 5]), "d_seconds");
        assert_eq!(before.len(), 4);
        assert_eq!(before[3], (f64::INFINITY, 5.0));
        // Since then: 50 in (0, 0.01], 40 in (0.01, 0.1], 10 in (0.1, 1].
        let after = buckets(&scrape([55, 95, 105, 105]), "d_seconds");
        let p50 = quantile_between(&before, &after, 0.5).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        // The 99th of 100 is the 9th of the 10 in (0.1, 1].
        let p99 = quantile_between(&before, &after, 0.99).unwrap();
        assert!((p99 - 0.91).abs() < 1e-9, "{p99}");
        // Beyond the highest finite bound: that bound.
        let beyond = buckets(&scrape([55, 95, 105, 205]), "d_seconds");
        assert_eq!(quantile_between(&before, &beyond, 0.99), Some(1.0));
        assert_eq!(quantile_between(&before, &before, 0.5), None);
    }

    #[test]
    fn samples_of_one_metric_with_their_labels() {
        let text = "# HELP lb_backend_transitions Changes\n\
                    lb_backend_transitions_total{service=\"10.200.0.10:9944/tcp\",backend=\"10.200.10.2:9944\",to=\"down\",cause=\"health\"} 2\n\
                    lb_backend_transitions_total_other 9\n\
                    lb_backend_set_changes_total 7\n";
        let found: Vec<Sample> = samples(text, "lb_backend_transitions_total").collect();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].value, 2.0);
        assert_eq!(found[0].label("to"), Some("down"));
        assert_eq!(found[0].label("backend"), Some("10.200.10.2:9944"));
        assert_eq!(
            samples(text, "lb_backend_set_changes_total")
                .next()
                .unwrap()
                .value,
            7.0
        );
    }
}
