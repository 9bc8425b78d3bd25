//! The cache of loaded models a service keeps on its worker thread: at most `max` entries, the least
//! recently used dropped first — before loading a new one, so that two large models need not fit at once.

/// Entries keyed by `K`, most recently used last.
pub struct Lru<K, V> {
    max: usize,
    entries: Vec<(K, V)>,
    /// The `service` label of `ferrotune_models_loaded`, when this cache reports its size.
    metered: Option<&'static str>,
}

impl<K: PartialEq, V> Lru<K, V> {
    /// Empty; keeps at most `max` (at least 1) entries.
    pub fn new(max: usize) -> Self {
        Self { max: max.max(1), entries: vec![], metered: None }
    }

    /// Reports the number of entries as `ferrotune_models_loaded{service}`.
    pub fn metered(mut self, service: &'static str) -> Self {
        self.metered = Some(service);
        self.report();
        self
    }

    fn report(&self) {
        if let Some(s) = self.metered {
            crate::metrics::MODELS_LOADED.set(&[s], self.entries.len() as f64);
        }
    }

    /// Whether `key` is cached; if so it becomes the most recently used (checks meant only for new entries go
    /// before [`Lru::get_or_load`] when this says no).
    pub fn touch(&mut self, key: &K) -> bool {
        match self.entries.iter().position(|(k, _)| k == key) {
            Some(i) => {
                let e = self.entries.remove(i);
                self.entries.push(e);
                true
            }
            None => false,
        }
    }

    /// The entry for `key`, marked most recently used; `load` makes it when absent (an error leaves the cache
    /// without it, already evicted entries stay evicted).
    pub fn get_or_load<E>(&mut self, key: K, load: impl FnOnce() -> Result<V, E>) -> Result<&mut V, E> {
        if !self.touch(&key) {
            while self.entries.len() >= self.max {
                self.entries.remove(0);
            }
            self.report();
            let v = load()?;
            self.entries.push((key, v));
            self.report();
        }
        Ok(&mut self.entries.last_mut().expect("just pushed").1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_goes_first() {
        let mut c: Lru<&str, u32> = Lru::new(2);
        let mut loads = 0;
        let mut get = |c: &mut Lru<&str, u32>, k: &'static str| {
            *c.get_or_load::<()>(k, || {
                loads += 1;
                Ok(k.len() as u32)
            })
            .unwrap()
        };
        get(&mut c, "a");
        get(&mut c, "bb");
        get(&mut c, "a"); // a is now the most recent
        get(&mut c, "ccc"); // evicts bb
        get(&mut c, "a");
        get(&mut c, "bb"); // reloaded, evicts ccc
        assert_eq!(loads, 4);
        assert_eq!(c.entries.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec!["a", "bb"]);
        assert!(c.touch(&"a") && !c.touch(&"ccc"));
        assert_eq!(c.entries.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec!["bb", "a"]);
        assert!(c.get_or_load("x", || Err("bad")).is_err());
        assert_eq!(c.entries.len(), 1, "evicted to make room even though the load failed");
    }
}
