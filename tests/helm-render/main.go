// helm-render renders a Helm chart the way `helm template` does, for tests on a machine where
// no helm binary can be installed: Go's text/template with sprig v3 (the engine Helm is built
// on) plus Helm's own additions (include, tpl, required, toYaml, fromYaml, toJson, lookup,
// .Files, .Release, .Chart, .Capabilities). Only what this project's chart uses is covered.
//
// Usage: helm-render CHART_DIR [-f VALUES.yaml]... [--namespace NS] [--name RELEASE]
package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig/v3"
	"gopkg.in/yaml.v2"
)

type chartMeta struct {
	Name        string `yaml:"name"`
	Version     string `yaml:"version"`
	AppVersion  string `yaml:"appVersion"`
	APIVersion  string `yaml:"apiVersion"`
	KubeVersion string `yaml:"kubeVersion"`
}

// Files gives templates the chart's other files, as Helm's .Files does.
type Files struct{ root string }

func (f Files) Get(name string) string {
	b, err := os.ReadFile(filepath.Join(f.root, name))
	if err != nil {
		return ""
	}
	return string(b)
}

// normalize turns yaml.v2's map[interface{}]interface{} into map[string]interface{} as Helm's
// values are.
func normalize(v interface{}) interface{} {
	switch t := v.(type) {
	case map[interface{}]interface{}:
		m := map[string]interface{}{}
		for k, x := range t {
			m[fmt.Sprint(k)] = normalize(x)
		}
		return m
	case []interface{}:
		for i := range t {
			t[i] = normalize(t[i])
		}
		return t
	}
	return v
}

// merge lays src over dst: maps merge key by key, anything else replaces (Helm's coalescing;
// a null in src removes the key).
func merge(dst, src map[string]interface{}) map[string]interface{} {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		if sm, ok := v.(map[string]interface{}); ok {
			if dm, ok := dst[k].(map[string]interface{}); ok {
				dst[k] = merge(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
	return dst
}

func loadYAML(path string) map[string]interface{} {
	b, err := os.ReadFile(path)
	if err != nil {
		fail("%v", err)
	}
	var v interface{}
	if err := yaml.Unmarshal(b, &v); err != nil {
		fail("%s: %v", path, err)
	}
	if v == nil {
		return map[string]interface{}{}
	}
	m, ok := normalize(v).(map[string]interface{})
	if !ok {
		fail("%s: not a map", path)
	}
	return m
}

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "helm-render: "+format+"\n", a...)
	os.Exit(1)
}

func toYaml(v interface{}) string {
	b, err := yaml.Marshal(v)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(b), "\n")
}

func main() {
	args := os.Args[1:]
	if len(args) == 0 {
		fail("usage: helm-render CHART_DIR [-f VALUES.yaml]... [--namespace NS] [--name RELEASE]")
	}
	dir := args[0]
	namespace, release := "default", "thinbd"
	var overrides []string
	for i := 1; i < len(args); i++ {
		if i+1 >= len(args) {
			fail("%s needs a value", args[i])
		}
		switch args[i] {
		case "-f":
			overrides = append(overrides, args[i+1])
		case "--namespace":
			namespace = args[i+1]
		case "--name":
			release = args[i+1]
		default:
			fail("unknown argument %s", args[i])
		}
		i++
	}

	var meta chartMeta
	b, err := os.ReadFile(filepath.Join(dir, "Chart.yaml"))
	if err != nil {
		fail("%v", err)
	}
	if err := yaml.Unmarshal(b, &meta); err != nil {
		fail("Chart.yaml: %v", err)
	}
	if meta.APIVersion != "v2" || meta.Name == "" || meta.Version == "" {
		fail("Chart.yaml: apiVersion v2, name and version are required")
	}
	values := loadYAML(filepath.Join(dir, "values.yaml"))
	for _, o := range overrides {
		values = merge(values, loadYAML(o))
	}

	top := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name": release, "Namespace": namespace, "Service": "Helm", "IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Chart":        map[string]interface{}{"Name": meta.Name, "Version": meta.Version, "AppVersion": meta.AppVersion},
		"Files":        Files{root: dir},
		"Capabilities": map[string]interface{}{"KubeVersion": map[string]interface{}{"Version": "v1.34.0", "Major": "1", "Minor": "34"}},
	}

	t := template.New("gotpl").Option("missingkey=zero")
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env")
	delete(funcs, "expandenv")
	funcs["toYaml"] = toYaml
	funcs["fromYaml"] = func(s string) map[string]interface{} {
		var v interface{}
		if err := yaml.Unmarshal([]byte(s), &v); err != nil {
			return map[string]interface{}{"Error": err.Error()}
		}
		m, _ := normalize(v).(map[string]interface{})
		return m
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return v, fmt.Errorf("%s", msg)
		}
		return v, nil
	}
	funcs["lookup"] = func(string, string, string, string) map[string]interface{} { return map[string]interface{}{} }
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		err := t.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		c, err := t.Clone()
		if err != nil {
			return "", err
		}
		c, err = c.New("tpl").Parse(text)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		err = c.Execute(&buf, data)
		return buf.String(), err
	}
	t.Funcs(funcs)

	var names []string
	tdir := filepath.Join(dir, "templates")
	err = filepath.Walk(tdir, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		name := meta.Name + "/" + filepath.ToSlash(rel)
		src, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if _, err := t.New(name).Parse(string(src)); err != nil {
			return err
		}
		names = append(names, name)
		return nil
	})
	if err != nil {
		fail("%v", err)
	}
	sort.Strings(names)
	for _, name := range names {
		base := filepath.Base(name)
		if strings.HasPrefix(base, "_") || strings.HasSuffix(base, ".txt") {
			continue
		}
		var buf bytes.Buffer
		top["Template"] = map[string]interface{}{"Name": name, "BasePath": meta.Name + "/templates"}
		if err := t.ExecuteTemplate(&buf, name, top); err != nil {
			fail("%v", err)
		}
		out := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(out) == "" {
			continue
		}
		fmt.Printf("---\n# Source: %s\n%s\n", name, strings.TrimSpace(out))
	}
}
