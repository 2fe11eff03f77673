//! `-o yaml`: the CLI's JSON answers as YAML documents (the same fields, for people who read
//! them and for tools that take YAML).

use yaml_rust2::Yaml;

fn convert(v: &serde_json::Value) -> Yaml {
    match v {
        serde_json::Value::Null => Yaml::Null,
        serde_json::Value::Bool(b) => Yaml::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            // Beyond i64 (u64 sizes above 2^63 never occur, floats do): written as they print.
            None => Yaml::Real(n.to_string()),
        },
        serde_json::Value::String(s) => Yaml::String(s.clone()),
        serde_json::Value::Array(a) => Yaml::Array(a.iter().map(convert).collect()),
        serde_json::Value::Object(o) => {
            Yaml::Hash(o.iter().map(|(k, v)| (Yaml::String(k.clone()), convert(v))).collect())
        }
    }
}

/// `v` as one YAML document, ending in a newline.
pub fn to_yaml(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let mut emitter = yaml_rust2::YamlEmitter::new(&mut out);
    // Emitting into a String cannot fail.
    let _ = emitter.dump(&convert(v));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_answers_read_back_the_same_as_yaml() {
        let v = serde_json::json!({
            "name": "pg-data", "size_bytes": 21474836480u64, "available": true, "labels": {"a": "b"},
            "replicas": [{"node": "node-1", "state": "UpToDate"}], "none": null, "ratio": 0.5, "odd": "yes: no",
        });
        let text = super::to_yaml(&v);
        let back = &yaml_rust2::YamlLoader::load_from_str(&text).unwrap()[0];
        assert_eq!(back["name"].as_str(), Some("pg-data"));
        assert_eq!(back["size_bytes"].as_i64(), Some(21474836480));
        assert_eq!(back["available"].as_bool(), Some(true));
        assert_eq!(back["labels"]["a"].as_str(), Some("b"));
        assert_eq!(back["replicas"][0]["state"].as_str(), Some("UpToDate"));
        assert!(back["none"].is_null());
        assert_eq!(back["ratio"].as_f64(), Some(0.5));
        assert_eq!(back["odd"].as_str(), Some("yes: no"), "{text}");
    }
}
