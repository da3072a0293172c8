//! [`Labels`]: a Kubernetes `map[string]string` (labels, annotations, selectors), kept as a
//! list sorted by key.
//!
//! Every pod, Service and selector of the mesh has one, most with a handful of entries: a
//! `BTreeMap` allocates a whole node (eleven keys and values, ~550 B) for the first entry,
//! where the list costs its entries. Iteration order is the key order a `BTreeMap` gives,
//! which the model's outputs (`/config_dump`, selector indexes) rely on; a later entry with
//! a key already present replaces its value, as `BTreeMap::insert` does.

use std::fmt;

use serde::{Serialize, Serializer};

/// Key–value pairs, sorted by key and without repeated keys.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    pub const fn new() -> Self {
        Labels(Vec::new())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Where `key` is, or where it would go.
    fn position(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        let i = self.position(key).ok()?;
        self.0.get(i).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// Sets `key` to `value`; the value it replaces, if any.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.position(&key) {
            Ok(i) => self.0.get_mut(i).map(|(_, v)| std::mem::replace(v, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    /// In key order.
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.0.iter())
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &String> + ExactSizeIterator + '_ {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &String> + ExactSizeIterator + '_ {
        self.0.iter().map(|(_, v)| v)
    }

    /// Sorts `self.0` by key, keeps the last of entries with the same key and gives back the
    /// spare capacity.
    fn normalize(&mut self) {
        // Stable: of equal keys, the one given last stays last.
        self.0.sort_by(|a, b| a.0.cmp(&b.0));
        // `later` is removed; its value moves to the entry kept.
        self.0.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(&mut later.1, &mut kept.1);
            }
            same
        });
        self.0.shrink_to_fit();
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut labels = Labels(iter.into_iter().collect());
        labels.normalize();
        labels
    }
}

impl Extend<(String, String)> for Labels {
    fn extend<I: IntoIterator<Item = (String, String)>>(&mut self, iter: I) {
        self.0.extend(iter);
        self.normalize();
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

/// The entries of [`Labels`], in key order.
#[derive(Clone, Debug)]
pub struct Iter<'a>(std::slice::Iter<'a, (String, String)>);

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a String, &'a String);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (k, v))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|(k, v)| (k, v))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a String, &'a String);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl IntoIterator for Labels {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// As a map, like the `BTreeMap` it replaces.
impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

/// For the tools that keep a `BTreeMap` (the e2e harness's declarations).
impl From<Labels> for std::collections::BTreeMap<String, String> {
    fn from(labels: Labels) -> Self {
        labels.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The same entries in a `BTreeMap`, the type `Labels` stands in for.
    fn reference(p: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs(p).into_iter().collect()
    }

    fn listed(l: &Labels) -> Vec<(&str, &str)> {
        l.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn entries_iterate_in_key_order_whatever_the_order_given() {
        let given = [
            ("version", "v1"),
            ("app", "web"),
            ("pod-template-hash", "h1"),
            ("App", "upper"),
        ];
        let l: Labels = pairs(&given).into_iter().collect();
        let want = [
            ("App", "upper"),
            ("app", "web"),
            ("pod-template-hash", "h1"),
            ("version", "v1"),
        ];
        assert_eq!(listed(&l), want);
        let keys: Vec<&String> = l.keys().collect();
        assert_eq!(keys, reference(&given).keys().collect::<Vec<_>>());
        let values: Vec<&String> = l.values().collect();
        assert_eq!(values, reference(&given).values().collect::<Vec<_>>());
        let backwards: Vec<(&String, &String)> = l.iter().rev().collect();
        assert_eq!(backwards.first().map(|(k, _)| k.as_str()), Some("version"));
        assert_eq!(l.iter().len(), 4);
        assert_eq!(
            BTreeMap::from(l.clone()),
            reference(&given),
            "converts to the map it stands for"
        );
        let owned: Vec<(String, String)> = l.into_iter().collect();
        assert_eq!(owned, pairs(&want));
    }

    #[test]
    fn get_and_insert_behave_like_a_map() {
        let mut l = Labels::new();
        assert!(l.is_empty());
        assert_eq!(l.get("app"), None);
        for (k, v) in [("b", "2"), ("d", "4"), ("a", "1"), ("c", "3")] {
            assert_eq!(l.insert(k.into(), v.into()), None, "{k} is new");
        }
        assert_eq!(listed(&l), [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]);
        assert_eq!(
            l.insert("c".into(), "three".into()),
            Some("3".to_string()),
            "replacing a key gives back the old value"
        );
        assert_eq!(l.len(), 4, "and adds no entry");
        assert_eq!(l.get("c").map(String::as_str), Some("three"));
        assert_eq!(l.get("a").map(String::as_str), Some("1"));
        assert_eq!(l.get("d").map(String::as_str), Some("4"));
        assert_eq!(l.get("e"), None);
        assert_eq!(l.get(""), None);
        assert!(l.contains_key("b"));
        assert!(!l.contains_key("bb"));
    }

    #[test]
    fn a_repeated_key_keeps_the_value_given_last() {
        let given = [("app", "a"), ("tier", "x"), ("app", "b"), ("app", "c")];
        let l: Labels = pairs(&given).into_iter().collect();
        assert_eq!(listed(&l), [("app", "c"), ("tier", "x")]);
        let mut extended = l.clone();
        extended.extend(pairs(&[("tier", "y"), ("zone", "z"), ("app", "d")]));
        assert_eq!(
            listed(&extended),
            [("app", "d"), ("tier", "y"), ("zone", "z")]
        );
        assert_eq!(
            Labels::from([("k".to_string(), "1".to_string()), ("k".into(), "2".into())]),
            Labels::from([("k".to_string(), "2".to_string())])
        );
    }

    #[test]
    fn equality_debug_and_json_are_the_maps() {
        let given = [("version", "v1"), ("app", "web")];
        let l: Labels = pairs(&given).into_iter().collect();
        let reversed: Labels = pairs(&given).into_iter().rev().collect();
        assert_eq!(l, reversed, "equal whatever the order given");
        assert_ne!(l, Labels::from([("app".to_string(), "web".to_string())]));
        assert_eq!(format!("{l:?}"), format!("{:?}", reference(&given)));
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(json, r#"{"app":"web","version":"v1"}"#);
        assert_eq!(json, serde_json::to_string(&reference(&given)).unwrap());
        let back: BTreeMap<String, String> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.into_iter().collect::<Labels>(), l, "round trip");
        assert_eq!(serde_json::to_string(&Labels::new()).unwrap(), "{}");
    }

    #[test]
    fn built_labels_hold_no_spare_capacity() {
        // What the model keeps per pod: three labels cost three entries.
        let l: Labels = (0..3)
            .map(|i| (format!("k{i}"), format!("v{i}")))
            .filter(|_| true) // no exact size hint, as a translator's iterator
            .collect();
        assert_eq!(l.0.capacity(), 3);
    }
}
