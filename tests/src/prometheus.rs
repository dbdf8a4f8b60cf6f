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

#[cfg(test)]
mod tests {
    use super::*;

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
