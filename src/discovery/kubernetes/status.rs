//! The MCS status conditions meshd writes on each ServiceExport (`Valid`, `Ready`, `Conflict`),
//! and the decision whether the object's status needs a patch at all.
//!
//! Pure: the conditions wanted for an export are computed from its verdicts and merged with the
//! conditions it has, keeping `lastTransitionTime` where a condition's status did not change and
//! every condition type meshd does not own. A patch is due only when the merged list differs
//! from the one the object carries, so a status write never causes another.

use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The condition types meshd owns on a ServiceExport.
pub(crate) const VALID: &str = "Valid";
pub(crate) const READY: &str = "Ready";
pub(crate) const CONFLICT: &str = "Conflict";
const OWNED: [&str; 3] = [VALID, READY, CONFLICT];

/// One condition's outcome: its status, a CamelCase reason and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub status: bool,
    /// One reason, or several joined with commas (the MCS API's way to combine conflicts).
    pub reason: Cow<'static, str>,
    pub message: String,
}

impl Verdict {
    pub fn yes(reason: impl Into<Cow<'static, str>>, message: String) -> Self {
        Verdict {
            status: true,
            reason: reason.into(),
            message,
        }
    }

    pub fn no(reason: impl Into<Cow<'static, str>>, message: String) -> Self {
        Verdict {
            status: false,
            reason: reason.into(),
            message,
        }
    }
}

/// A `metav1.Condition` as found in (and written to) `status.conditions`. Lenient on read:
/// a missing field is empty rather than a reason to drop the whole status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Condition {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default)]
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub last_transition_time: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
}

/// The conditions of a status object (`status.conditions`); empty when absent or unreadable.
pub(crate) fn conditions_of(status: Option<&serde_json::Value>) -> Vec<Condition> {
    status
        .and_then(|s| s.get("conditions"))
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default()
}

/// The conditions an export should carry: `wanted` (in order) merged into `current`. A wanted
/// condition keeps its `lastTransitionTime` when its status is unchanged, else takes `now`;
/// owned types not wanted are dropped; other controllers' conditions stay as they are.
pub(crate) fn merge(
    current: &[Condition],
    wanted: &[(&'static str, &Verdict)],
    observed_generation: Option<i64>,
    now: &str,
) -> Vec<Condition> {
    let mut merged: Vec<Condition> = wanted
        .iter()
        .map(|(type_, verdict)| {
            let status = if verdict.status { "True" } else { "False" };
            let since = current
                .iter()
                .find(|c| c.type_ == *type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| now.to_string());
            Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                observed_generation,
                last_transition_time: since,
                reason: verdict.reason.to_string(),
                message: verdict.message.clone(),
            }
        })
        .collect();
    merged.extend(
        current
            .iter()
            .filter(|c| !OWNED.contains(&c.type_.as_str()))
            .cloned(),
    );
    merged
}

/// True when two condition lists say the same, whatever their order.
pub(crate) fn same(a: &[Condition], b: &[Condition]) -> bool {
    let sorted = |list: &[Condition]| {
        let mut list = list.to_vec();
        list.sort_by(|x, y| x.type_.cmp(&y.type_));
        list
    };
    a.len() == b.len() && sorted(a) == sorted(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unchanged_statuses_keep_their_transition_time_and_foreign_conditions_stay() {
        let current = conditions_of(Some(&json!({"conditions": [
            {"type": "Valid", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "Valid", "message": "old"},
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "Exported", "message": "m"},
            {"type": "Conflict", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "NoConflicts", "message": "m"},
            {"type": "Audited", "status": "True", "lastTransitionTime": "2025-01-01T00:00:00Z", "reason": "Seen", "message": "by another controller"},
        ]})));
        assert_eq!(current.len(), 4);
        let valid = Verdict::yes("Valid", "new message".into());
        let ready = Verdict::no("Failed", "m".into());
        let merged = merge(
            &current,
            &[(VALID, &valid), (READY, &ready)],
            Some(3),
            "2026-02-02T00:00:00Z",
        );
        let got: Vec<(&str, &str, &str)> = merged
            .iter()
            .map(|c| {
                (
                    c.type_.as_str(),
                    c.status.as_str(),
                    c.last_transition_time.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("Valid", "True", "2026-01-01T00:00:00Z"),
                ("Ready", "False", "2026-02-02T00:00:00Z"),
                ("Audited", "True", "2025-01-01T00:00:00Z"),
            ]
        );
        assert_eq!(merged[0].message, "new message");
        assert_eq!(merged[0].observed_generation, Some(3));
        assert!(!same(&merged, &current));
        let again = merge(
            &merged,
            &[(VALID, &valid), (READY, &ready)],
            Some(3),
            "2026-03-03T00:00:00Z",
        );
        assert!(same(&again, &merged));
        let mut reversed = merged.clone();
        reversed.reverse();
        assert!(same(&reversed, &merged));
    }

    #[test]
    fn unreadable_conditions_count_as_none() {
        assert!(conditions_of(None).is_empty());
        assert!(conditions_of(Some(&json!({"conditions": "yes"}))).is_empty());
        let written = serde_json::to_value(merge(
            &[],
            &[(VALID, &Verdict::no("NoService", "x".into()))],
            None,
            "2026-01-01T00:00:00Z",
        ))
        .unwrap();
        assert_eq!(
            written,
            json!([{"type": "Valid", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "NoService", "message": "x"}])
        );
    }
}
