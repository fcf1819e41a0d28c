//! What a qtfs mount must give back to an engine after a reconnect: every inode the kernel
//! still holds (its parent, name, HOST inode number and lookup count) and every open
//! handle (its node, open flags and opener). Engine ids are per connection; a new engine
//! re-registers these under the same ids (`Reserve`, `Relookup`, `Reopen`), so the kernel's
//! inode numbers and file handles stay valid and nothing else in the client changes.
//!
//! Ids here are the client's inode numbers (FUSE ino 1 is the mount's root).
//!
//! Concurrency: plain data; the client keeps it behind one `Mutex`, touched once per
//! entry reply, forget, rename, unlink, open and release.

use std::collections::HashMap;

use super::proto::Creds;

/// The mount's root inode number.
pub const ROOT: u64 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
struct KnownNode {
    parent: u64,
    /// Empty once the name is gone (unlinked, or replaced by a rename): the node is then
    /// not restorable, only its lookup count is kept.
    name: Box<[u8]>,
    host_ino: u64,
    nlookup: u64,
}

/// An open handle to reopen after a reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownFile {
    pub node: u64,
    /// The flags the engine opened it with, without creation flags.
    pub flags: i32,
    pub dir: bool,
    pub creds: Creds,
}

/// One node to look up again: `name` in `parent` is `node` if it is still `host_ino`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relookup {
    pub node: u64,
    pub parent: u64,
    pub name: Vec<u8>,
    pub host_ino: u64,
    pub nlookup: u64,
}

/// What a reconnect must restore, in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Every id in use is below this.
    pub floor: u64,
    /// Nodes by depth: every node's parent is the root or in an earlier level.
    pub levels: Vec<Vec<Relookup>>,
    /// Nodes the kernel holds that have no name any more (open but unlinked): lost.
    pub nameless: usize,
    pub files: Vec<(u64, KnownFile)>,
}

#[derive(Debug, Default)]
pub struct Known {
    nodes: HashMap<u64, KnownNode>,
    names: HashMap<(u64, Box<[u8]>), u64>,
    files: HashMap<u64, KnownFile>,
}

impl Known {
    /// The kernel got an entry for `node` as `name` in `parent` (one more lookup).
    pub fn looked_up(&mut self, parent: u64, name: &[u8], node: u64, host_ino: u64) {
        if node == ROOT || name == b"." || name == b".." {
            if let Some(n) = self.nodes.get_mut(&node) {
                n.nlookup += 1;
            }
            return;
        }
        let key = (parent, Box::<[u8]>::from(name));
        let n = self.nodes.entry(node).or_insert_with(|| KnownNode {
            parent,
            name: key.1.clone(),
            host_ino,
            nlookup: 0,
        });
        n.nlookup += 1;
        if n.name.is_empty() {
            n.parent = parent;
            n.name = key.1.clone();
        }
        if let Some(old) = self.names.insert(key, node) {
            if old != node {
                self.unname(old);
            }
        }
    }

    /// The kernel forgot `n` lookups of `node`.
    pub fn forgot(&mut self, node: u64, n: u64) {
        let Some(k) = self.nodes.get_mut(&node) else {
            return;
        };
        k.nlookup = k.nlookup.saturating_sub(n);
        if k.nlookup > 0 {
            return;
        }
        if let Some(k) = self.nodes.remove(&node) {
            let key = (k.parent, k.name);
            if self.names.get(&key) == Some(&node) {
                self.names.remove(&key);
            }
        }
    }

    /// `name` in `parent` was unlinked or removed.
    pub fn removed(&mut self, parent: u64, name: &[u8]) {
        if let Some(node) = self.names.remove(&(parent, Box::from(name))) {
            self.unname(node);
        }
    }

    /// `name` in `parent` is now `newname` in `newparent` (any node there before is
    /// unlinked); with `exchange`, the two names swapped.
    pub fn renamed(
        &mut self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        exchange: bool,
    ) {
        let from = (parent, Box::<[u8]>::from(name));
        let to = (newparent, Box::<[u8]>::from(newname));
        let moved = self.names.remove(&from);
        let replaced = self.names.remove(&to);
        if let Some(node) = moved {
            self.name(node, to.clone());
            self.names.insert(to, node);
        }
        match replaced {
            Some(node) if exchange => {
                self.name(node, from.clone());
                self.names.insert(from, node);
            }
            Some(node) if Some(node) != moved => self.unname(node),
            _ => {}
        }
    }

    pub fn opened(&mut self, fh: u64, file: KnownFile) {
        self.files.insert(fh, file);
    }

    pub fn released(&mut self, fh: u64) {
        self.files.remove(&fh);
    }

    /// The open handle `fh`, if the kernel holds it.
    pub fn file(&self, fh: u64) -> Option<&KnownFile> {
        self.files.get(&fh)
    }

    fn name(&mut self, node: u64, (parent, name): (u64, Box<[u8]>)) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.parent = parent;
            n.name = name;
        }
    }

    fn unname(&mut self, node: u64) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.name = Box::default();
        }
    }

    /// Number of nodes and open handles held.
    pub fn len(&self) -> (usize, usize) {
        (self.nodes.len(), self.files.len())
    }

    /// What a reconnect restores.
    pub fn plan(&self) -> Plan {
        let mut depth: HashMap<u64, Option<usize>> = HashMap::with_capacity(self.nodes.len());
        let mut plan = Plan::default();
        for &id in self.nodes.keys() {
            if let Some(d) = self.depth(id, &mut depth) {
                if plan.levels.len() <= d {
                    plan.levels.resize_with(d + 1, Vec::new);
                }
                let n = &self.nodes[&id];
                plan.levels[d].push(Relookup {
                    node: id,
                    parent: n.parent,
                    name: n.name.to_vec(),
                    host_ino: n.host_ino,
                    nlookup: n.nlookup,
                });
            } else {
                plan.nameless += 1;
            }
        }
        plan.files = self
            .files
            .iter()
            .filter(|(_, f)| f.node == ROOT || depth.get(&f.node).is_some_and(Option::is_some))
            .map(|(fh, f)| (*fh, f.clone()))
            .collect();
        plan.files.sort_by_key(|(fh, _)| *fh);
        let top = self
            .nodes
            .keys()
            .chain(self.files.keys())
            .copied()
            .chain([ROOT])
            .max()
            .unwrap_or(ROOT);
        plan.floor = top + 1;
        plan
    }

    /// The node's distance below the root (0: a child of the root), or None when it or an
    /// ancestor has no name (or the chain does not reach the root).
    fn depth(&self, id: u64, memo: &mut HashMap<u64, Option<usize>>) -> Option<usize> {
        let mut chain = Vec::new();
        let mut cur = id;
        let base = loop {
            if let Some(d) = memo.get(&cur) {
                break *d;
            }
            let Some(n) = self.nodes.get(&cur) else {
                break None;
            };
            if n.name.is_empty() || chain.len() > self.nodes.len() {
                break None;
            }
            chain.push(cur);
            if n.parent == ROOT {
                break Some(usize::MAX); // the root's depth, one above level 0
            }
            cur = n.parent;
        };
        let mut d = base;
        for &c in chain.iter().rev() {
            d = d.map(|d| d.wrapping_add(1));
            memo.insert(c, d);
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(node: u64) -> KnownFile {
        KnownFile {
            node,
            flags: libc::O_RDONLY,
            dir: false,
            creds: Creds::default(),
        }
    }

    #[test]
    fn plan_orders_parents_first_and_counts_lookups() {
        let mut k = Known::default();
        k.looked_up(ROOT, b"a", 10, 100);
        k.looked_up(10, b"b", 11, 101);
        k.looked_up(11, b"c", 12, 102);
        k.looked_up(11, b"c", 12, 102);
        k.looked_up(ROOT, b"z", 20, 200);
        k.opened(30, file(12));
        let p = k.plan();
        assert_eq!(p.floor, 31);
        assert_eq!(p.levels.len(), 3);
        let mut top: Vec<u64> = p.levels[0].iter().map(|r| r.node).collect();
        top.sort();
        assert_eq!(top, vec![10, 20]);
        assert_eq!(p.levels[1][0].node, 11);
        assert_eq!(p.levels[2][0].nlookup, 2);
        assert_eq!(p.levels[2][0].name, b"c");
        assert_eq!(p.files, vec![(30, file(12))]);
        assert_eq!(p.nameless, 0);
    }

    #[test]
    fn forgets_drop_nodes_and_their_names() {
        let mut k = Known::default();
        k.looked_up(ROOT, b"a", 10, 100);
        k.looked_up(ROOT, b"a", 10, 100);
        k.forgot(10, 1);
        assert_eq!(k.len(), (1, 0));
        k.forgot(10, 1);
        assert_eq!(k.len(), (0, 0));
        // The name is free for a new node.
        k.looked_up(ROOT, b"a", 11, 101);
        assert_eq!(k.plan().levels[0][0].node, 11);
    }

    #[test]
    fn renames_move_names_and_unlinked_nodes_are_lost_with_their_children() {
        let mut k = Known::default();
        k.looked_up(ROOT, b"dir", 10, 100);
        k.looked_up(10, b"f", 11, 101);
        k.looked_up(ROOT, b"g", 12, 102);
        k.looked_up(ROOT, b"old", 13, 103);
        // f moves to the root as "old", replacing node 13.
        k.renamed(10, b"f", ROOT, b"old", false);
        let p = k.plan();
        let names: Vec<(u64, u64, Vec<u8>)> = p
            .levels
            .iter()
            .flatten()
            .map(|r| (r.node, r.parent, r.name.clone()))
            .collect();
        assert!(names.contains(&(11, ROOT, b"old".to_vec())), "{names:?}");
        assert!(!names.iter().any(|n| n.0 == 13), "replaced node is lost");
        assert_eq!(p.nameless, 1);
        // An exchange swaps both names.
        k.renamed(ROOT, b"old", ROOT, b"g", true);
        let p = k.plan();
        let find = |n: u64| {
            p.levels
                .iter()
                .flatten()
                .find(|r| r.node == n)
                .map(|r| r.name.clone())
        };
        assert_eq!(find(11), Some(b"g".to_vec()));
        assert_eq!(find(12), Some(b"old".to_vec()));
        // Removing a directory's name loses it and whatever is below it.
        k.looked_up(10, b"child", 14, 104);
        k.opened(40, file(14));
        k.removed(ROOT, b"dir");
        let p = k.plan();
        assert_eq!(p.nameless, 3, "dir, its child and the replaced node");
        assert!(
            p.files.is_empty(),
            "a handle on a lost node is not reopened"
        );
        k.released(40);
        assert_eq!(k.len().1, 0);
    }

    #[test]
    fn dot_names_and_the_root_only_count() {
        let mut k = Known::default();
        k.looked_up(ROOT, b"a", 10, 100);
        k.looked_up(10, b"..", ROOT, 1);
        k.looked_up(10, b".", 10, 100);
        let p = k.plan();
        assert_eq!(p.levels[0][0].nlookup, 2);
        assert_eq!(p.levels[0][0].name, b"a");
        k.opened(50, file(ROOT));
        assert_eq!(k.plan().files.len(), 1, "handles on the root are reopened");
    }
}
