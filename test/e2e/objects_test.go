//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"

	"github.com/kubekms/kubekms/test/e2e/cluster"
)

// written is every object the suite wrote and the API acknowledged, with the
// plaintext it must read back: "secrets/ns/name" or "configmaps/ns/name".
type written struct {
	mu   sync.Mutex
	objs map[string]string
}

func newWritten() *written { return &written{objs: map[string]string{}} }

func (w *written) add(resource, ns, name, value string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.objs[resource+"/"+ns+"/"+name] = value
}

func (w *written) get(key string) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.objs[key]
}

func (w *written) snapshot() map[string]string {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make(map[string]string, len(w.objs))
	for k, v := range w.objs {
		out[k] = v
	}
	return out
}

func ensureNamespace(ctx context.Context, c kubernetes.Interface, ns string) error {
	_, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s: %w", ns, err)
	}
	return nil
}

func createSecret(ctx context.Context, c kubernetes.Interface, w *written, ns, name, value string) error {
	_, err := c.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Data:       map[string][]byte{"value": []byte(value)},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create secret %s/%s: %w", ns, name, err)
	}
	w.add("secrets", ns, name, value)
	return nil
}

func createConfigMap(ctx context.Context, c kubernetes.Interface, w *written, ns, name, value string) error {
	_, err := c.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Data:       map[string]string{"value": value},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create configmap %s/%s: %w", ns, name, err)
	}
	w.add("configmaps", ns, name, value)
	return nil
}

// readBack gets every written object through the API and compares its value;
// it returns how many matched and the first few problems.
func readBack(ctx context.Context, c kubernetes.Interface, objs map[string]string) (ok int, problems []string) {
	keys := make([]string, 0, len(objs))
	for k := range objs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		parts := strings.SplitN(k, "/", 3)
		var got string
		var err error
		switch parts[0] {
		case "secrets":
			var s *corev1.Secret
			if s, err = c.CoreV1().Secrets(parts[1]).Get(ctx, parts[2], metav1.GetOptions{}); err == nil {
				got = string(s.Data["value"])
			}
		case "configmaps":
			var cm *corev1.ConfigMap
			if cm, err = c.CoreV1().ConfigMaps(parts[1]).Get(ctx, parts[2], metav1.GetOptions{}); err == nil {
				got = cm.Data["value"]
			}
		}
		switch {
		case err != nil:
			problems = append(problems, fmt.Sprintf("%s: %v", k, err))
		case got != objs[k]:
			problems = append(problems, fmt.Sprintf("%s: value differs from what was written", k))
		default:
			ok++
		}
	}
	return ok, problems
}

// requireReadBack fails the test unless every object reads back.
func requireReadBack(ctx context.Context, t *testing.T, c kubernetes.Interface, objs map[string]string, when string) {
	t.Helper()
	ok, problems := readBack(ctx, c, objs)
	t.Logf("%s: %d/%d written objects read back with their value", when, ok, len(objs))
	if len(problems) > 0 {
		if len(problems) > 10 {
			problems = append(problems[:10], fmt.Sprintf("... and %d more", len(problems)-10))
		}
		t.Errorf("%s: %d objects did not read back:\n  %s", when, len(objs)-ok, strings.Join(problems, "\n  "))
	}
}

// storedEncrypted reads every Secret and ConfigMap value from etcd.
func storedEncrypted(ctx context.Context, t *testing.T, e *cluster.Etcd) []cluster.Stored {
	t.Helper()
	var all []cluster.Stored
	for _, prefix := range []string{"/registry/secrets/", "/registry/configmaps/"} {
		s, err := e.ReadStored(ctx, prefix)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, s...)
	}
	return all
}

// storedByKey indexes stored values by their "resource/ns/name" key.
func storedByKey(values []cluster.Stored) map[string]cluster.Stored {
	m := make(map[string]cluster.Stored, len(values))
	for _, v := range values {
		m[strings.TrimPrefix(v.Key, "/registry/")] = v
	}
	return m
}

// maxDecryptsPerSeed bounds the Decrypt calls one stored seed can cause when
// a kube-apiserver v1.37 starts. It caches each decrypted seed but does not
// merge concurrent misses, and with ConcurrentWatchObjectDecode (on by default
// since 1.37) each watch cache decodes up to processEventConcurrency (10) + 1
// objects at once (k8s.io/apiserver pkg/storage/etcd3/watcher.go); secrets and
// configmaps are two watch caches; plus headroom for reads the apiserver makes
// straight from etcd while it starts. Far below one Decrypt per object.
const maxDecryptsPerSeed = 2*(10+1) + 10

// seedStats counts the distinct DEK seeds and the distinct wrapped local KEKs
// of kubekms among kms v2 values.
func seedStats(values []cluster.Stored) (seeds, localKEKs int) {
	s, l := map[string]bool{}, map[string]bool{}
	for _, v := range values {
		if v.Object == nil {
			continue
		}
		s[v.SeedID()] = true
		l[v.LocalKEKID()] = true
	}
	return len(s), len(l)
}

// leaks reports whether a value (or its base64 form) appears in raw bytes.
func leaks(raw []byte, value string) bool {
	return bytes.Contains(raw, []byte(value)) || bytes.Contains(raw, []byte(base64.StdEncoding.EncodeToString([]byte(value))))
}

// migrate rewrites every Secret and ConfigMap through the API (a storage
// migration: the apiserver re-encrypts values it read as stale).
func migrate(ctx context.Context, c kubernetes.Interface) (int, error) {
	n := 0
	secrets, err := c.CoreV1().Secrets("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return n, fmt.Errorf("list secrets: %w", err)
	}
	for _, s := range secrets.Items {
		err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
			cur, err := c.CoreV1().Secrets(s.Namespace).Get(ctx, s.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			_, err = c.CoreV1().Secrets(s.Namespace).Update(ctx, cur, metav1.UpdateOptions{})
			return err
		})
		if err != nil && !apierrors.IsNotFound(err) {
			return n, fmt.Errorf("rewrite secret %s/%s: %w", s.Namespace, s.Name, err)
		}
		n++
	}
	cms, err := c.CoreV1().ConfigMaps("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return n, fmt.Errorf("list configmaps: %w", err)
	}
	for _, cm := range cms.Items {
		err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
			cur, err := c.CoreV1().ConfigMaps(cm.Namespace).Get(ctx, cm.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			_, err = c.CoreV1().ConfigMaps(cm.Namespace).Update(ctx, cur, metav1.UpdateOptions{})
			return err
		})
		if err != nil && !apierrors.IsNotFound(err) {
			return n, fmt.Errorf("rewrite configmap %s/%s: %w", cm.Namespace, cm.Name, err)
		}
		n++
	}
	return n, nil
}
