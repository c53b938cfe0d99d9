package convergence

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Observer reads every apiserver of a cluster.
type Observer struct {
	// Kube lists the identity Leases (and, with FromEndpoints, the
	// kubernetes Service's endpoints). Required.
	Kube kubernetes.Interface
	// Config holds the credentials and TLS settings used to reach each
	// apiserver (its Host is replaced by each URL). Reading /metrics needs
	// the permission to GET the non-resource URL /metrics.
	Config *rest.Config
	// URLs are the apiservers to read ("https://10.0.0.1:6443"). When
	// empty: the kubernetes Service's endpoints if FromEndpoints (Config.Host
	// when it lists none), else Config.Host alone. The identity Leases tell
	// whether every apiserver was reached.
	URLs          []string
	FromEndpoints bool
	// Provider is the KMS v2 provider name to judge; empty: the one each
	// apiserver writes with (the only one, or the last one written with).
	Provider string
	// KeyIDs maps key_id hashes to readable key_ids (from plugins' Status),
	// for the report.
	KeyIDs map[string]string
	// Timeout bounds each HTTP request (default 10 s).
	Timeout time.Duration
	// Now is the clock (time.Now when nil).
	Now func() time.Time

	mu      sync.Mutex
	clients map[string]*http.Client
}

// Apiserver is one apiserver's state in a Report.
type Apiserver struct {
	URL      string `json:"url"`
	Identity string `json:"identity,omitempty"` // its identity Lease's name
	Hostname string `json:"hostname,omitempty"`
	IDHash   string `json:"apiserverIDHash,omitempty"`
	Provider string `json:"provider,omitempty"`
	// KeyIDHash is the key_id hash it writes new values under now; empty
	// when that cannot be told (see Reason).
	KeyIDHash string `json:"keyIDHash,omitempty"`
	KeyID     string `json:"keyID,omitempty"` // readable, when a plugin told it
	// Basis says how KeyIDHash is known: "write" (a value was written under
	// it after the last Status poll) or "status" (the last Status poll
	// returned it and the apiserver's KMS check passes, so its write seed is
	// under it).
	Basis string `json:"basis,omitempty"`
	// Since bounds when it switched to KeyIDHash: not before this time (the
	// last use of another key_id, or the process start); the switch came at
	// the next Status poll, at most a minute later. Zero when unknown.
	Since      time.Time `json:"since,omitzero"`
	LastStatus *KeyUse   `json:"lastStatus,omitempty"`
	LastWrite  *KeyUse   `json:"lastWrite,omitempty"`
	KMSHealthy bool      `json:"kmsHealthy"`
	ConfigHash string    `json:"encryptionConfigHash,omitempty"`
	// WritesStopped is set when its plugin's last Status reported
	// StoppedKeyID (KeyIDHash is then StoppedKeyIDHash, which names no key):
	// the apiserver writes under its previous seed until that expires, then
	// refuses writes. It never agrees with anything.
	WritesStopped bool `json:"writesStopped,omitempty"`
	// Reason explains an empty KeyIDHash, stopped writes, or a failed read.
	Reason string `json:"reason,omitempty"`
	// Denied is set when the apiserver refused the credentials (401/403):
	// waiting does not help.
	Denied bool `json:"denied,omitempty"`
}

// Report is one observation of the whole cluster.
type Report struct {
	At         time.Time   `json:"at"`
	Leases     []Lease     `json:"leases"`
	Apiservers []Apiserver `json:"apiservers"`
	// Agreed is true when every apiserver with a live identity Lease was
	// read and all write under the same provider and key_id.
	Agreed    bool   `json:"agreed"`
	Provider  string `json:"provider,omitempty"`
	KeyIDHash string `json:"keyIDHash,omitempty"`
	KeyID     string `json:"keyID,omitempty"`
	// Problems are why there is no agreement (besides differing key_ids).
	Problems []string `json:"problems"`
	// Warnings do not prevent agreement (e.g. differing encryption configs).
	Warnings []string `json:"warnings"`
}

// Name is how messages name an apiserver: identity (hostname) or its URL.
func (a Apiserver) Name() string {
	switch {
	case a.Identity != "" && a.Hostname != "":
		return fmt.Sprintf("%s (%s, %s)", a.Identity, a.Hostname, a.URL)
	case a.Identity != "":
		return fmt.Sprintf("%s (%s)", a.Identity, a.URL)
	}
	return a.URL
}

// Laggards describes every reason the cluster is not writing under target
// (a key_id hash): apiservers under another or an unknown key, and the
// problems that prevent telling. Empty when converged.
func (r *Report) Laggards(target string) []string {
	out := slices.Clone(r.Problems)
	for _, a := range r.Apiservers {
		if a.WritesStopped || a.KeyIDHash == "" || (target == "" && !r.Agreed) || (target != "" && a.KeyIDHash != target) {
			out = append(out, a.state())
		}
	}
	if len(r.Apiservers) == 0 && len(out) == 0 {
		out = append(out, "no apiserver was read")
	}
	return out
}

// States says, per apiserver, what it writes under (or why that is not
// known), and the problems that prevent agreement.
func (r *Report) States() []string {
	out := slices.Clone(r.Problems)
	for _, a := range r.Apiservers {
		out = append(out, a.state())
	}
	return out
}

// state says what a writes under, or why that is not known.
func (a Apiserver) state() string {
	switch {
	case a.WritesStopped:
		return fmt.Sprintf("%s: %s", a.Name(), a.Reason)
	case a.KeyIDHash == "":
		return fmt.Sprintf("%s: key_id unknown: %s", a.Name(), a.Reason)
	}
	return fmt.Sprintf("%s writes under %s", a.Name(), describeKey(a.KeyIDHash, a.KeyID))
}

// Converged reports whether every apiserver writes under target.
func (r *Report) Converged(target string) bool {
	return r.Agreed && r.KeyIDHash == target
}

func describeKey(hash, keyID string) string {
	if keyID != "" {
		return fmt.Sprintf("%s (%s)", keyID, short(hash))
	}
	return hash
}

func short(hash string) string {
	if len(hash) > 7+12 {
		return hash[:7+12] + "…"
	}
	return hash
}

func (o *Observer) now() time.Time {
	if o.Now != nil {
		return o.Now()
	}
	return time.Now()
}

// Observe reads the Leases and every apiserver once. Failures to reach one
// apiserver are in the Report; the error is only for a cancelled ctx or a
// missing configuration.
func (o *Observer) Observe(ctx context.Context) (*Report, error) {
	if o.Kube == nil || o.Config == nil {
		return nil, errors.New("convergence: Observer needs Kube and Config")
	}
	rep := &Report{At: o.now().UTC(), Leases: []Lease{}, Apiservers: []Apiserver{}, Problems: []string{}, Warnings: []string{}}
	leases, leaseErr := ListLeases(ctx, o.Kube)
	if leaseErr != nil {
		rep.Problems = append(rep.Problems, leaseErr.Error()+": cannot tell how many apiservers there are")
	}
	rep.Leases = append(rep.Leases, leases...)
	urls, warning, err := o.urls(ctx)
	if err != nil {
		rep.Problems = append(rep.Problems, err.Error())
	}
	if warning != "" {
		rep.Warnings = append(rep.Warnings, warning)
	}
	rep.Apiservers = make([]Apiserver, len(urls))
	var wg sync.WaitGroup
	for i, u := range urls {
		wg.Go(func() { rep.Apiservers[i] = o.read(ctx, u) })
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	o.judge(rep, leaseErr == nil)
	return rep, nil
}

func (o *Observer) urls(ctx context.Context) (urls []string, warning string, err error) {
	if len(o.URLs) > 0 {
		return o.URLs, "", nil
	}
	host := strings.TrimSuffix(o.Config.Host, "/")
	if o.FromEndpoints {
		urls, err := EndpointURLs(ctx, o.Kube)
		if err != nil {
			return nil, "", err
		}
		if len(urls) > 0 {
			return urls, "", nil
		}
		warning = "the kubernetes service lists no apiserver endpoints: read only " + host
	}
	return []string{host}, warning, nil
}

// read asks one apiserver for its KMS check and its metrics. /readyz is read
// before and after /metrics, and both must pass: the check runs the KMS
// Status poll (at most every 20 s when it passes, 3 s when it fails), which
// also moves the apiserver to a new key_id sooner than its own one-minute
// poll would.
func (o *Observer) read(ctx context.Context, url string) Apiserver {
	a := Apiserver{URL: url}
	hc, err := o.client(url)
	if err != nil {
		a.Reason = err.Error()
		return a
	}
	before, err := o.get(ctx, hc, url+"/readyz?verbose")
	if err != nil {
		a.Reason, a.Denied = err.Error(), errors.Is(err, errDenied)
		return a
	}
	body, err := o.get(ctx, hc, url+"/metrics")
	if err != nil {
		a.Reason, a.Denied = err.Error(), errors.Is(err, errDenied)
		return a
	}
	m, err := ParseMetrics(strings.NewReader(body))
	if err != nil {
		a.Reason = err.Error()
		return a
	}
	after, err := o.get(ctx, hc, url+"/readyz?verbose")
	if err != nil {
		a.Reason = err.Error()
		return a
	}
	h1, h2 := ParseReadyz(before), ParseReadyz(after)
	judgeApiserver(&a, m, h1.OK() && h2.OK(), o.Provider)
	if len(h2.Checks) == 0 && a.Reason == "" {
		a.Reason = "its /readyz lists no kms-provider check (no KMS provider in its encryption config?)"
		a.KeyIDHash, a.Basis = "", ""
	}
	o.mu.Lock()
	if id, ok := o.KeyIDs[a.KeyIDHash]; ok {
		a.KeyID = id
	}
	o.mu.Unlock()
	return a
}

// judgeApiserver fills in what m and the KMS check say a writes under.
func judgeApiserver(a *Apiserver, m *Metrics, kmsHealthy bool, provider string) {
	a.IDHash, a.ConfigHash, a.KMSHealthy = m.IDHash, m.ConfigHash, kmsHealthy
	name, reason := pickProvider(m, provider)
	if name == "" && reason != "" {
		a.Reason = reason
		return
	}
	a.Provider = name
	p := m.Providers[name]
	if p == nil || len(p.Status) == 0 {
		a.Reason = fmt.Sprintf("no KMS v2 Status poll recorded for provider %q", name)
		return
	}
	st := p.Status[0]
	a.LastStatus = &st
	if len(p.Writes) > 0 {
		w := p.Writes[0]
		a.LastWrite = &w
	}
	switch {
	case st.Hash == StoppedKeyIDHash:
		// Whatever it wrote since: its seed is no longer extended and
		// expires; this is not a key it writes under.
		previous := ""
		if a.LastWrite != nil {
			previous = a.LastWrite.Hash
		}
		a.KeyIDHash, a.KeyID, a.Basis, a.WritesStopped = st.Hash, StoppedKeyID, "status", true
		a.Reason = describeStopped(previous)
	case a.LastWrite != nil && a.LastWrite.Last.After(st.Last):
		// The write seed only changes at a Status poll: a write after the
		// last poll shows the seed in use.
		a.KeyIDHash, a.Basis = a.LastWrite.Hash, "write"
	case kmsHealthy:
		a.KeyIDHash, a.Basis = st.Hash, "status"
	default:
		a.Reason = "its KMS provider check fails: the last Status poll did not give it a write seed under the key_id it returned " +
			"(the apiserver keeps writing under its previous seed for up to 3 minutes, then refuses writes)"
		return
	}
	a.Since = m.Started
	for _, list := range [][]KeyUse{p.Status, p.Writes} {
		for _, u := range list {
			if u.Hash != a.KeyIDHash && u.Last.After(a.Since) {
				a.Since = u.Last
			}
		}
	}
}

// pickProvider chooses the provider to judge: the given one, else the only
// one with a Status poll, else the one written with last.
func pickProvider(m *Metrics, want string) (string, string) {
	if want != "" {
		return want, ""
	}
	var names []string
	var newest string
	var newestAt time.Time
	for name, p := range m.Providers {
		if len(p.Status) > 0 {
			names = append(names, name)
		}
		if len(p.Writes) > 0 && p.Writes[0].Last.After(newestAt) {
			newest, newestAt = name, p.Writes[0].Last
		}
	}
	slices.Sort(names)
	switch {
	case len(names) == 1:
		return names[0], ""
	case newest != "":
		return newest, ""
	case len(names) == 0:
		return "", "its metrics show no KMS v2 provider (none configured, or no Status poll yet)"
	}
	return "", fmt.Sprintf("several KMS v2 providers (%s) and no write yet: name the one to check", strings.Join(names, ", "))
}

// judge matches apiservers to Leases and decides agreement.
func (o *Observer) judge(rep *Report, leasesKnown bool) {
	byHash := map[string]*Lease{}
	now := rep.At
	live := 0
	for i := range rep.Leases {
		l := &rep.Leases[i]
		if !l.Expired(now) {
			live++
			byHash[l.IDHash()] = l
		}
	}
	matched := map[string]bool{}
	for i := range rep.Apiservers {
		a := &rep.Apiservers[i]
		if l := byHash[a.IDHash]; l != nil && a.IDHash != "" {
			a.Identity, a.Hostname = l.Identity, l.Hostname
			if matched[a.IDHash] {
				rep.Problems = append(rep.Problems, fmt.Sprintf("%s was read twice (two URLs reach the same apiserver, e.g. through a load balancer)", a.Name()))
			}
			matched[a.IDHash] = true
		} else if leasesKnown && a.IDHash != "" {
			rep.Problems = append(rep.Problems, fmt.Sprintf("%s (apiserver_id_hash %s) holds no live identity lease", a.URL, short(a.IDHash)))
		}
		if a.KeyIDHash == "" && a.Reason == "" {
			a.Reason = "unknown"
		}
	}
	if leasesKnown {
		for _, l := range rep.Leases {
			if !l.Expired(now) && !matched[l.IDHash()] {
				host := ""
				if l.Hostname != "" {
					host = " (" + l.Hostname + ")"
				}
				rep.Problems = append(rep.Problems, fmt.Sprintf("apiserver %s%s holds a live identity lease but was not read: give its URL", l.Identity, host))
			}
		}
		if live == 0 {
			rep.Problems = append(rep.Problems, "no live apiserver identity lease in kube-system (is the APIServerIdentity feature off?)")
		}
	}
	configs := map[string]bool{}
	for _, a := range rep.Apiservers {
		if a.ConfigHash != "" {
			configs[a.ConfigHash] = true
		}
	}
	if len(configs) > 1 {
		rep.Warnings = append(rep.Warnings, fmt.Sprintf("the apiservers run %d different encryption configurations", len(configs)))
	}
	if len(rep.Problems) > 0 || len(rep.Apiservers) == 0 {
		return
	}
	first := rep.Apiservers[0]
	for _, a := range rep.Apiservers {
		if a.KeyIDHash == "" || a.WritesStopped || a.KeyIDHash != first.KeyIDHash || a.Provider != first.Provider {
			return
		}
	}
	rep.Agreed, rep.Provider, rep.KeyIDHash, rep.KeyID = true, first.Provider, first.KeyIDHash, first.KeyID
}

func (o *Observer) client(url string) (*http.Client, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if c := o.clients[url]; c != nil {
		return c, nil
	}
	cfg := rest.CopyConfig(o.Config)
	cfg.Host = url
	cfg.Timeout = o.Timeout
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	c, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("client for %s: %w", url, err)
	}
	if o.clients == nil {
		o.clients = map[string]*http.Client{}
	}
	o.clients[url] = c
	return c, nil
}

var errDenied = errors.New("the credentials may not read it")

// get returns the body of a GET; /readyz answers 500 when a check fails,
// with the same verbose body, so any status with a body is an answer.
func (o *Observer) get(ctx context.Context, hc *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Accept", "text/plain;version=0.0.4")
	resp, err := hc.Do(req)
	if err != nil {
		return "", fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return "", fmt.Errorf("GET %s: %w", url, err)
	}
	switch {
	case resp.StatusCode == http.StatusOK:
	case resp.StatusCode == http.StatusInternalServerError && strings.Contains(url, "/readyz"):
	case resp.StatusCode == http.StatusForbidden || resp.StatusCode == http.StatusUnauthorized:
		return "", fmt.Errorf("GET %s: %s: %w (needs get on the non-resource URL, e.g. the system:monitoring group)", url, resp.Status, errDenied)
	default:
		return "", fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(body[:min(len(body), 200)])))
	}
	return string(body), nil
}
