//! Revisions: a stable name for each pod template, and whether moving between two of them can
//! happen in place.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::PodTemplateSpec;

use crate::api::GrayAppSpec;
use crate::model::Ordinal;

/// A pod template under its revision name.
#[derive(Clone, Debug, PartialEq)]
pub struct Revision {
    pub name: String,
    pub template: PodTemplateSpec,
}

impl Revision {
    /// The template under its revision name (which hashes the template's JSON).
    pub fn new(app: &str, template: PodTemplateSpec) -> Result<Self, serde_json::Error> {
        Ok(Self {
            name: revision_name(app, &template)?,
            template,
        })
    }

    pub fn images(&self) -> BTreeMap<String, String> {
        images(&self.template)
    }
}

/// The revisions a spec asks for: the template's, and one per variant.
#[derive(Clone, Debug)]
pub struct Wanted {
    pub update: Revision,
    /// Ordinal → revision name, for variant instances.
    pub variant_of: BTreeMap<Ordinal, String>,
    /// Revision name → variant name.
    pub variant_names: BTreeMap<String, String>,
    /// The update revision first, then the variants'.
    pub all: Vec<Revision>,
}

impl Wanted {
    /// Fails with a readable reason when a variant names a container the template lacks.
    pub fn for_spec(app: &str, spec: &GrayAppSpec) -> Result<Self, String> {
        let unhashable =
            |err: serde_json::Error| format!("the pod template cannot be hashed: {err}");
        let update = Revision::new(app, spec.template.clone()).map_err(unhashable)?;
        let containers: BTreeSet<String> = update.images().into_keys().collect();
        let mut wanted = Wanted {
            update: update.clone(),
            variant_of: BTreeMap::new(),
            variant_names: BTreeMap::new(),
            all: vec![update],
        };
        for variant in &spec.variants {
            if let Some(unknown) = variant.images.keys().find(|c| !containers.contains(*c)) {
                return Err(format!(
                    "variant {} sets the image of container {unknown}, which the template does not have",
                    variant.name
                ));
            }
            let revision = Revision::new(app, with_images(&spec.template, &variant.images))
                .map_err(unhashable)?;
            for ordinal in &variant.instances {
                wanted.variant_of.insert(*ordinal, revision.name.clone());
            }
            wanted
                .variant_names
                .insert(revision.name.clone(), variant.name.clone());
            wanted.all.push(revision);
        }
        Ok(wanted)
    }
}

/// `<app>-<hash>`: the same template always gets the same name, in any process. The hash is
/// FNV-1a over the template's JSON, whose object keys serde_json sorts.
pub fn revision_name(app: &str, template: &PodTemplateSpec) -> Result<String, serde_json::Error> {
    let json = serde_json::to_vec(template)?;
    let hash = json.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    Ok(format!("{app}-{:010x}", hash & 0xff_ffff_ffff))
}

/// Container name to image (app containers; init containers never change in place).
pub fn images(template: &PodTemplateSpec) -> BTreeMap<String, String> {
    template
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
        .collect()
}

/// The template with some containers' images replaced; names that match no container are
/// ignored.
pub fn with_images(
    template: &PodTemplateSpec,
    replace: &BTreeMap<String, String>,
) -> PodTemplateSpec {
    let mut out = template.clone();
    for container in out.spec.iter_mut().flat_map(|s| s.containers.iter_mut()) {
        if let Some(image) = replace.get(&container.name) {
            container.image = Some(image.clone());
        }
    }
    out
}

/// Whether a pod of `from` can become one of `to` by patching its running pod: only container
/// images, labels and annotations may differ (the fields Kubernetes lets us change on a live pod
/// that restart a container).
pub fn in_place_compatible(from: &PodTemplateSpec, to: &PodTemplateSpec) -> bool {
    fn normalized(t: &PodTemplateSpec) -> PodTemplateSpec {
        let mut t = t.clone();
        if let Some(meta) = t.metadata.as_mut() {
            meta.labels = None;
            meta.annotations = None;
        }
        for c in t.spec.iter_mut().flat_map(|s| s.containers.iter_mut()) {
            c.image = None;
        }
        t
    }
    let same_containers = |a: &PodTemplateSpec, b: &PodTemplateSpec| {
        let names = |t: &PodTemplateSpec| {
            t.spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
        };
        names(a) == names(b)
    };
    same_containers(from, to) && normalized(from) == normalized(to)
}

/// Containers whose image differs between two templates, with the image of `to`.
pub fn changed_images(from: &PodTemplateSpec, to: &PodTemplateSpec) -> BTreeMap<String, String> {
    let before = images(from);
    images(to)
        .into_iter()
        .filter(|(name, image)| before.get(name) != Some(image))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn template(image: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some([("app".to_string(), "ocr".to_string())].into()),
                ..ObjectMeta::default()
            }),
            spec: Some(PodSpec {
                containers: vec![
                    Container {
                        name: "ocr".into(),
                        image: Some(image.into()),
                        ..Container::default()
                    },
                    Container {
                        name: "sidecar".into(),
                        image: Some("proxy:1".into()),
                        ..Container::default()
                    },
                ],
                ..PodSpec::default()
            }),
        }
    }

    fn revision_name(app: &str, template: &PodTemplateSpec) -> String {
        super::revision_name(app, template).expect("a template serialises")
    }

    #[test]
    fn names_are_stable_and_distinct() {
        assert_eq!(
            revision_name("ocr", &template("ocr:v7")),
            revision_name("ocr", &template("ocr:v7"))
        );
        assert_ne!(
            revision_name("ocr", &template("ocr:v7")),
            revision_name("ocr", &template("ocr:v8"))
        );
        assert!(revision_name("ocr", &template("ocr:v7")).starts_with("ocr-"));
        assert_eq!(
            revision_name("ocr", &template("x")).len(),
            "ocr-".len() + 10
        );
    }

    #[test]
    fn image_and_label_changes_are_in_place() {
        let mut to = template("ocr:v8");
        if let Some(meta) = to.metadata.as_mut() {
            meta.labels = Some(
                [
                    ("app".to_string(), "ocr".to_string()),
                    ("track".to_string(), "canary".to_string()),
                ]
                .into(),
            );
        }
        assert!(in_place_compatible(&template("ocr:v7"), &to));
        assert_eq!(
            changed_images(&template("ocr:v7"), &to),
            [("ocr".to_string(), "ocr:v8".to_string())].into()
        );
    }

    #[test]
    fn other_changes_need_a_new_pod() {
        let mut to = template("ocr:v8");
        if let Some(spec) = to.spec.as_mut() {
            spec.containers[0].env = Some(vec![EnvVar {
                name: "A".into(),
                value: Some("1".into()),
                ..EnvVar::default()
            }]);
        }
        assert!(!in_place_compatible(&template("ocr:v7"), &to));
        let mut fewer = template("ocr:v7");
        if let Some(spec) = fewer.spec.as_mut() {
            spec.containers.pop();
        }
        assert!(!in_place_compatible(&template("ocr:v7"), &fewer));
    }

    #[test]
    fn variants_replace_only_named_images() {
        let v = with_images(
            &template("ocr:v7"),
            &[
                ("ocr".to_string(), "ocr:v9".to_string()),
                ("nope".to_string(), "x".to_string()),
            ]
            .into(),
        );
        assert_eq!(
            images(&v),
            [
                ("ocr".to_string(), "ocr:v9".to_string()),
                ("sidecar".to_string(), "proxy:1".to_string())
            ]
            .into()
        );
    }
}
