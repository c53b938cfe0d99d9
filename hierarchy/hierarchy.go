// Package hierarchy is the local key hierarchy: a local KEK (AES-256-GCM)
// seals the apiserver's seeds, and the remote key service wraps only the local
// KEK, once. Unwrapped local KEKs are cached so Decrypt makes no remote call
// for a known local KEK; a new local KEK is made when the remote key ID
// changes, after MaxUses encryptions, or after MaxAge.
//
// The hierarchy also owns the behaviour every backend shares: retries of
// transient errors, outage grace, crypto-shredding on revocation, and a cached
// health probe.
package hierarchy

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"golang.org/x/sync/singleflight"

	"github.com/kubekms/kubekms/internal/metrics"
	"github.com/kubekms/kubekms/keyservice"
)

// Config tunes the hierarchy. Zero values take the defaults.
type Config struct {
	// MaxUses is how many seeds one local KEK seals (default 2^21).
	MaxUses uint64
	// MaxAge is how long one local KEK seals new seeds (default 7 days).
	MaxAge time.Duration
	// CacheSize bounds the unwrapped local KEKs kept (default 1000).
	CacheSize int
	// ProbeInterval is how long a health probe result is reused, and how
	// often the background loop probes (default DefaultProbeInterval).
	ProbeInterval time.Duration
	// OutageGrace is how long the plugin keeps serving from its cache and
	// current local KEK while the key service is unreachable (default 1 h).
	OutageGrace time.Duration
	// RevocationBound is the longest time between the key service revoking
	// the key and the plugin dropping the local KEKs it wrapped (default 1 m).
	RevocationBound time.Duration
	// RemoteTimeout bounds a remote call made without a caller's deadline
	// (start-up, background probes; default 10 s).
	RemoteTimeout time.Duration
	// MaxConcurrentRemote bounds concurrent remote calls (default 16).
	MaxConcurrentRemote int
	// StatusBudget bounds how long Status waits for a fresh probe before it
	// answers from the last known state (default 1 s): the apiserver gives
	// Status 3 s by default, and a hung key service must not make it time out.
	StatusBudget time.Duration
	// State, if set, keeps the current local KEK (wrapped) across restarts.
	State StateStore
	// SealFormat is the ciphertext format Encrypt writes: SealFormatInline
	// (the default) or SealFormatAnnotation. Decrypt reads every format.
	// Plugins made before format 3 read formats 1 and 2 only, so during a
	// rolling upgrade of several plugins that share data the new ones write
	// format 2 until every one is upgraded (docs/operations.md).
	SealFormat int

	Logger  *slog.Logger
	Metrics *metrics.Metrics
	Tracer  trace.Tracer
	// Now is the clock; tests replace it.
	Now func() time.Time
}

// DefaultProbeInterval matches kube-apiserver's own polling: it caches a
// healthy Status answer for 20 s, so with kubelet probes hitting /livez and
// /readyz it asks about every 20 s (every minute without them). A probe result
// reused for up to 20 s means each Status answer is at most one apiserver poll
// behind the key service.
const DefaultProbeInterval = 20 * time.Second

func (c *Config) defaults() {
	if c.MaxUses == 0 {
		c.MaxUses = 1 << 21
	}
	if c.MaxAge == 0 {
		c.MaxAge = 7 * 24 * time.Hour
	}
	if c.CacheSize == 0 {
		c.CacheSize = 1000
	}
	if c.ProbeInterval == 0 {
		c.ProbeInterval = DefaultProbeInterval
	}
	if c.OutageGrace == 0 {
		c.OutageGrace = time.Hour
	}
	if c.RevocationBound == 0 {
		c.RevocationBound = time.Minute
	}
	if c.RemoteTimeout == 0 {
		c.RemoteTimeout = 10 * time.Second
	}
	if c.MaxConcurrentRemote == 0 {
		c.MaxConcurrentRemote = 16
	}
	if c.StatusBudget == 0 {
		c.StatusBudget = time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Tracer == nil {
		c.Tracer = noop.NewTracerProvider().Tracer("")
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.SealFormat == 0 {
		c.SealFormat = SealFormatInline
	}
}

// localKEK is one local key-encrypting key.
type localKEK struct {
	key         []byte // zeroed on eviction (best effort: the AES key schedule in aead is not reachable)
	aead        cipher.AEAD
	annotation  []byte // encoded annotation value: format, created, wrapped
	remoteKeyID string
	created     time.Time
	uses        atomic.Uint64
}

func newLocalKEK(key, annotation []byte, remoteKeyID string, created time.Time) (*localKEK, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("local KEK: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("local KEK: %w", err)
	}
	return &localKEK{key: key, aead: aead, annotation: annotation, remoteKeyID: remoteKeyID, created: created}, nil
}

// kekID names a local KEK in the cache: the remote key ID and the wrapped
// bytes, which the key service authenticates. The rest of the annotation (the
// creation time) is authenticated by the seal, so a forged creation time finds
// the genuine entry and is refused by the seal, with no remote call.
type kekID struct{ keyID, wrapped string }

// Sealed is the result of Encrypt.
type Sealed struct {
	Ciphertext  []byte
	KeyID       string
	Annotations map[string][]byte // nil for format 3
}

// LocalKEK returns the encoded, wrapped local KEK that sealed s (inside the
// ciphertext or in its annotation): equal values mean the same local KEK.
func (s Sealed) LocalKEK() []byte {
	if checkSealed(s.Ciphertext) != nil {
		return nil
	}
	kek, _, err := splitSeal(s.Ciphertext, s.Annotations)
	if err != nil {
		return nil
	}
	return kek
}

// Hierarchy is safe for concurrent use.
type Hierarchy struct {
	svc    keyservice.Service
	cfg    Config
	log    *slog.Logger
	m      *metrics.Metrics
	tracer trace.Tracer
	now    func() time.Time

	current   atomic.Pointer[localKEK]
	cache     *lru.Cache[kekID, *localKEK]
	flight    singleflight.Group
	remoteSem chan struct{}

	mu      sync.Mutex
	machine healthMachine
	// usableUntil (Unix ns) caches the machine's Usable verdict for the hot
	// path: max while healthy, the end of the grace during an outage, 0 when
	// revoked or unreachable.
	usableUntil atomic.Int64

	stop chan struct{}
	done chan struct{}
}

// New builds a hierarchy over svc and starts its background probe loop. It
// tries to make (or restore) the first local KEK before it returns, so the
// first Encrypt is fast; if the key service is down it returns anyway and the
// loop keeps trying (Status says why it is not ready).
func New(ctx context.Context, svc keyservice.Service, cfg Config) (*Hierarchy, error) {
	cfg.defaults()
	if cfg.SealFormat != SealFormatAnnotation && cfg.SealFormat != SealFormatInline {
		return nil, fmt.Errorf("seal format %d: want %d or %d", cfg.SealFormat, SealFormatAnnotation, SealFormatInline)
	}
	h := &Hierarchy{
		svc: svc, cfg: cfg, log: cfg.Logger, m: cfg.Metrics, tracer: cfg.Tracer, now: cfg.Now,
		remoteSem: make(chan struct{}, cfg.MaxConcurrentRemote),
		stop:      make(chan struct{}), done: make(chan struct{}),
	}
	cache, err := lru.NewWithEvict(cfg.CacheSize, func(_ kekID, k *localKEK) {
		if k != h.current.Load() {
			clear(k.key)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("local KEK cache: %w", err)
	}
	h.cache = cache
	h.machine.grace = cfg.OutageGrace
	if err := h.start(ctx); err != nil {
		h.log.Warn("local key hierarchy not ready at start-up; retrying in the background", "error", err)
	}
	go h.loop()
	return h, nil
}

// start probes the key service and makes or restores the first local KEK.
func (h *Hierarchy) start(ctx context.Context) error {
	keyID, err := h.probe(ctx)
	if err != nil {
		return err
	}
	return h.ensureKEK(ctx, keyID)
}

// ensureKEK makes (or restores) a local KEK when there is none, and rotates
// ahead of the limits otherwise.
func (h *Hierarchy) ensureKEK(ctx context.Context, keyID string) error {
	if h.current.Load() != nil {
		h.maybeRotate(ctx)
		return nil
	}
	if h.cfg.State != nil && h.restore(ctx, keyID) {
		return nil
	}
	_, err := h.rotate(ctx, "startup")
	if err != nil {
		h.log.Warn("could not make a local KEK", "error", err)
	}
	return err
}

// Close stops the background loop. It does not close the key service.
func (h *Hierarchy) Close() {
	select {
	case <-h.stop:
	default:
		close(h.stop)
	}
	<-h.done
}

func (h *Hierarchy) loop() {
	defer close(h.done)
	every := min(h.cfg.ProbeInterval, h.cfg.RevocationBound)
	t := time.NewTicker(every)
	defer t.Stop()
	var changed <-chan struct{}
	if n, ok := h.svc.(keyservice.Notifier); ok {
		changed = n.Changed()
	}
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
		case <-changed:
			h.log.Info("key service reports a change; probing now")
		}
		ctx, cancel := context.WithTimeout(context.Background(), h.cfg.RemoteTimeout)
		h.Refresh(ctx)
		cancel()
	}
}

// Refresh probes the key service now and acts on the answer: a new local KEK
// for a changed remote key, dropped local KEKs for a revoked key or version.
// The background loop calls it every probe interval and whenever the key
// service reports a change; `kubekms serve` calls it on SIGHUP.
func (h *Hierarchy) Refresh(ctx context.Context) Health {
	if keyID, err := h.probe(ctx); err == nil { // probe logs its own failures
		_ = h.ensureKEK(ctx, keyID)
		h.checkCachedVersions(ctx, keyID)
	}
	return h.health()
}

// Encrypt seals plaintext (the apiserver's seed) with the current local KEK.
func (h *Hierarchy) Encrypt(ctx context.Context, plaintext []byte) (Sealed, error) {
	switch {
	case len(plaintext) == 0:
		return Sealed{}, badRequest("plaintext is empty")
	case len(plaintext) > MaxPlaintext:
		return Sealed{}, badRequest("plaintext is %d bytes; at most %d fit the apiserver's %d-byte ciphertext limit",
			len(plaintext), MaxPlaintext, MaxCiphertext)
	}
	k, err := h.encryptionKEK(ctx)
	if err != nil {
		return Sealed{}, err
	}
	format, size := sealV2, SealOverhead+len(plaintext)
	if n := inlineSize(k.annotation, len(plaintext)); h.cfg.SealFormat == SealFormatInline && n <= MaxCiphertext {
		format, size = sealV3, n
	}
	out := make([]byte, 0, size)
	out = append(out, format)
	if format == sealV3 {
		out = binary.BigEndian.AppendUint16(out, uint16(len(k.annotation)))
		out = append(out, k.annotation...)
	}
	nonce := out[len(out) : len(out)+nonceSize]
	if _, err := rand.Read(nonce); err != nil {
		return Sealed{}, fmt.Errorf("seal: nonce: %w", err)
	}
	out = k.aead.Seal(out[:len(out)+nonceSize], nonce, plaintext, sealAAD(format, k.remoteKeyID, k.annotation))
	s := Sealed{Ciphertext: out, KeyID: k.remoteKeyID}
	if format != sealV3 {
		s.Annotations = map[string][]byte{AnnotationKey: k.annotation}
	}
	return s, nil
}

// Decrypt opens a ciphertext made by Encrypt, given the key ID and
// annotations that Encrypt returned with it (none for format 3).
func (h *Hierarchy) Decrypt(ctx context.Context, keyID string, ciphertext []byte, annotations map[string][]byte) ([]byte, error) {
	if err := checkSealed(ciphertext); err != nil {
		return nil, err
	}
	if err := checkKeyID(ciphertext[0], keyID); err != nil {
		return nil, err
	}
	ann, seal, err := splitSeal(ciphertext, annotations)
	if err != nil {
		return nil, err
	}
	parsed, err := decodeAnnotation(ann, kekPlace(ciphertext[0]))
	if err != nil {
		return nil, err
	}
	if !h.usableNow() {
		return nil, h.refusal("decrypt")
	}
	open := func(k *localKEK) ([]byte, error) {
		out, err := k.aead.Open(nil, seal[:nonceSize], seal[nonceSize:], sealAAD(ciphertext[0], keyID, ann))
		if err != nil {
			return nil, badRequest("ciphertext failed authentication: the ciphertext, key_id or local KEK (annotation) was altered or swapped")
		}
		return out, nil
	}
	id := kekID{keyID, string(parsed.wrapped)}
	if k, ok := h.cache.Get(id); ok {
		h.m.CacheLookup(true)
		return open(k)
	}
	h.m.CacheLookup(false)
	k, err := h.unwrapKEK(ctx, id, parsed)
	if err != nil {
		return nil, err
	}
	out, err := open(k)
	if err != nil {
		// Only local KEKs that opened a genuine seal enter the cache: a
		// refused request never evicts a good entry.
		return nil, err
	}
	if _, loaded, _ := h.cache.PeekOrAdd(id, k); !loaded {
		h.m.CacheSize(h.cache.Len())
	}
	return out, nil
}

// encryptionKEK returns the local KEK for a new seal. It seals with the
// current local KEK, whose key ID Status reports (the apiserver discards a
// seed whose Encrypt key_id differs from Status's); a changed remote key gets
// a new local KEK from the probe that saw it. Only a missing, used-up or too
// old local KEK is replaced here.
func (h *Hierarchy) encryptionKEK(ctx context.Context) (*localKEK, error) {
	if !h.usableNow() {
		return nil, h.refusal("encrypt")
	}
	k := h.current.Load()
	reason := ""
	switch {
	case k == nil:
		reason = "startup"
	case k.uses.Load() >= h.cfg.MaxUses:
		reason = "max_uses"
	case h.now().Sub(k.created) >= h.cfg.MaxAge:
		reason = "max_age"
	}
	if reason == "" {
		h.use(ctx, k)
		return k, nil
	}
	nk, err := h.rotate(ctx, reason)
	if err == nil {
		h.use(ctx, nk)
		return nk, nil
	}
	// Outage tolerance: a used-up or old KEK stays in service while the key
	// service is unreachable, within the grace period.
	if k != nil && h.inGrace(err) && k.uses.Load() < hardMaxUses {
		h.log.Warn("keeping the current local KEK while the key service is unreachable", "reason", reason, "error", err)
		h.use(ctx, k)
		return k, nil
	}
	return nil, fmt.Errorf("make local KEK: %w", err)
}

// usableNow reports whether local KEKs may be used: the machine's Usable
// verdict, read without a lock.
func (h *Hierarchy) usableNow() bool {
	return h.now().UnixNano() < h.usableUntil.Load()
}

// refusal explains why local KEKs may not be used now, classified so the
// plugin answers FailedPrecondition (revoked) or Unavailable (unreachable).
func (h *Hierarchy) refusal(op string) error {
	v := h.verdict()
	if v.Mode == ModeRevoked {
		return keyservice.Revoked(op, errors.New(v.Reason))
	}
	if v.Usable { // the verdict changed since usableNow
		v.Reason = "key service state changed during the call; retry"
	}
	return keyservice.Transient(op, errors.New(v.Reason))
}

// use counts one seal with k.
func (h *Hierarchy) use(ctx context.Context, k *localKEK) {
	h.reserveUses(ctx, k, k.uses.Add(1))
}

// hardMaxUses is the most seals a KEK makes even during an outage: far below
// the 2^32 random-nonce bound of AES-GCM.
const hardMaxUses = 1 << 30

// rotate makes a new local KEK, wraps it remotely and makes it current. Calls
// that overlap share one remote call.
func (h *Hierarchy) rotate(ctx context.Context, reason string) (*localKEK, error) {
	v, err, _ := h.flight.Do("rotate", func() (any, error) {
		key := make([]byte, kekSize)
		if _, err := rand.Read(key); err != nil {
			return nil, fmt.Errorf("generate local KEK: %w", err)
		}
		var res keyservice.WrapResult
		err := h.remote(ctx, "wrap", func(ctx context.Context) (err error) {
			res, err = h.svc.Wrap(ctx, key)
			return err
		})
		if err != nil {
			clear(key)
			return nil, fmt.Errorf("wrap local KEK: %w", err)
		}
		if res.KeyID == "" || len(res.KeyID) > MaxKeyID {
			return nil, fmt.Errorf("key service returned a key ID of %d bytes (want 1..%d)", len(res.KeyID), MaxKeyID)
		}
		created := h.now()
		ann := encodeAnnotation(created, res.Wrapped)
		if len(AnnotationKey)+len(ann) > MaxAnnotations {
			return nil, fmt.Errorf("wrapped local KEK is %d bytes, over the apiserver's annotation limit", len(res.Wrapped))
		}
		k, err := newLocalKEK(key, ann, res.KeyID, time.Unix(created.Unix(), 0))
		if err != nil {
			return nil, err
		}
		h.install(k, reason)
		if h.cfg.State != nil {
			if err := h.cfg.State.Save(ctx, k.state()); err != nil {
				h.log.Warn("could not save the local KEK state; a restart will make a new local KEK", "error", err)
			}
		}
		return k, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*localKEK), nil
}

// install makes k current and caches it for Decrypt.
func (h *Hierarchy) install(k *localKEK, reason string) {
	parsed, _ := decodeAnnotation(k.annotation, "") // our own: well formed
	h.cache.Add(kekID{k.remoteKeyID, string(parsed.wrapped)}, k)
	h.current.Store(k)
	h.m.KEKCreated(reason)
	h.m.CacheSize(h.cache.Len())
	h.log.Info("new local KEK", "reason", reason, "key_id", k.remoteKeyID)
}

// maybeRotate rotates ahead of the limits from the background loop, so no
// Encrypt waits for the remote call.
func (h *Hierarchy) maybeRotate(ctx context.Context) {
	k := h.current.Load()
	if k == nil {
		return
	}
	v := h.verdict()
	if v.Mode != ModeHealthy {
		return
	}
	reason := ""
	switch {
	case v.RemoteKeyID != "" && k.remoteKeyID != v.RemoteKeyID:
		reason = "remote_key_changed"
	case k.uses.Load() >= h.cfg.MaxUses*9/10:
		reason = "max_uses"
	case h.now().Sub(k.created) >= h.cfg.MaxAge-2*h.cfg.ProbeInterval:
		reason = "max_age"
	}
	h.m.KEK(h.now().Sub(k.created), k.uses.Load())
	if reason == "" {
		return
	}
	if _, err := h.rotate(ctx, reason); err != nil {
		h.log.Warn("background local KEK rotation failed", "reason", reason, "error", err)
	}
}

// unwrapKEK unwraps a local KEK remotely; concurrent misses for one KEK
// share one remote call. The caller caches it once it has authenticated
// something with it.
func (h *Hierarchy) unwrapKEK(ctx context.Context, id kekID, parsed parsedAnnotation) (*localKEK, error) {
	v, err, _ := h.flight.Do("unwrap\x00"+strconv.Itoa(len(id.keyID))+"\x00"+id.keyID+id.wrapped, func() (any, error) {
		if k, ok := h.cache.Get(id); ok {
			return k, nil
		}
		var key []byte
		err := h.remote(ctx, "unwrap", func(ctx context.Context) (err error) {
			key, err = h.svc.Unwrap(ctx, id.keyID, parsed.wrapped)
			return err
		})
		if err != nil {
			if h.observeKeyID(err) {
				h.shred(id.keyID, err)
			}
			return nil, fmt.Errorf("unwrap local KEK: %w", err)
		}
		if len(key) != kekSize {
			clear(key)
			return nil, keyservice.Invalid("unwrap", fmt.Errorf("unwrapped local KEK is %d bytes, want %d", len(key), kekSize))
		}
		ann := encodeAnnotation(parsed.created, parsed.wrapped)
		return newLocalKEK(key, ann, id.keyID, parsed.created)
	})
	if err != nil {
		return nil, err
	}
	return v.(*localKEK), nil
}

// shred drops cached local KEKs wrapped by keyID (all of them when keyID is
// empty): the key service revoked the key, so the plugin must stop using it.
func (h *Hierarchy) shred(keyID string, cause error) {
	n := 0
	for _, ck := range h.cache.Keys() {
		k, ok := h.cache.Peek(ck)
		if ok && (keyID == "" || k.remoteKeyID == keyID) {
			h.cache.Remove(ck)
			clear(k.key)
			n++
		}
	}
	if cur := h.current.Load(); cur != nil && (keyID == "" || cur.remoteKeyID == keyID) {
		h.current.CompareAndSwap(cur, nil)
		clear(cur.key)
	}
	h.m.CacheSize(h.cache.Len())
	if n > 0 {
		h.log.Warn("key revoked by the key service: dropped the local KEKs it wrapped", "key_id", keyID, "dropped", n, "error", cause)
	}
}

// checkCachedVersions asks the key service, when it can tell cheaply,
// whether the older key IDs of cached local KEKs are still usable, and drops
// the local KEKs of revoked ones.
func (h *Hierarchy) checkCachedVersions(ctx context.Context, current string) {
	vc, ok := h.svc.(keyservice.VersionChecker)
	if !ok {
		return
	}
	seen := map[string]bool{current: true}
	for _, k := range h.cache.Values() {
		if seen[k.remoteKeyID] {
			continue
		}
		seen[k.remoteKeyID] = true
		keyID := k.remoteKeyID
		err := h.remote(ctx, "check", func(ctx context.Context) error { return vc.CheckKeyID(ctx, keyID) })
		if h.observeKeyID(err) {
			h.shred(keyID, err)
		}
	}
}

// remote runs one key-service operation with the concurrency bound, retries
// of transient errors (exponential backoff with jitter, within ctx's
// deadline), tracing and metrics.
func (h *Hierarchy) remote(ctx context.Context, op string, fn func(context.Context) error) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, h.cfg.RemoteTimeout)
		defer cancel()
	}
	ctx, span := h.tracer.Start(ctx, "keyservice."+op)
	defer span.End()
	select {
	case h.remoteSem <- struct{}{}:
	case <-ctx.Done():
		return keyservice.Transient(op, fmt.Errorf("waiting for a free remote call slot: %w", ctx.Err()))
	}
	defer func() { <-h.remoteSem }()
	h.m.RemoteInflight(1)
	defer h.m.RemoteInflight(-1)
	err := retry(ctx, func() error {
		start := h.now()
		err := fn(ctx)
		outcome := "ok"
		if err != nil {
			outcome = keyservice.Classify(err).String()
		}
		h.m.Remote(op, outcome, time.Since(start))
		return err
	})
	if err != nil {
		span.RecordError(err)
	}
	return err
}

// observeKeyID asks the health machine whether a revocation answer about
// one key ID means dropping that key ID's local KEKs.
func (h *Hierarchy) observeKeyID(err error) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.machine.observeKeyID(err)
}

// verdict is the health machine's verdict now.
func (h *Hierarchy) verdict() Verdict {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.machine.verdict(h.now())
}

// inGrace reports whether err is an outage (not a revocation or bad input)
// and the key service was last reachable within the grace period.
func (h *Hierarchy) inGrace(err error) bool {
	switch keyservice.Classify(err) {
	case keyservice.ClassRevoked, keyservice.ClassInvalid:
		return false
	}
	v := h.verdict()
	return v.Mode == ModeHealthy || v.Mode == ModeOutage
}

// probe asks the key service for its current key ID (no paid crypto call),
// feeds the answer to the health machine and carries out its effects:
// revocation drops the cache; a changed key ID is noted so the caller (or the
// background loop) makes a new local KEK.
func (h *Hierarchy) probe(ctx context.Context) (string, error) {
	v, err, _ := h.flight.Do("probe", func() (any, error) {
		var keyID string
		err := h.remote(ctx, "probe", func(ctx context.Context) (err error) {
			keyID, err = h.svc.Probe(ctx)
			return err
		})
		if err == nil && (keyID == "" || len(keyID) > MaxKeyID || keyID == StoppedKeyID) {
			err = keyservice.Invalid("probe", fmt.Errorf("key service reported a key ID of %d bytes (want 1..%d, not %q)", len(keyID), MaxKeyID, StoppedKeyID))
		}
		h.mu.Lock()
		eff := h.machine.observe(h.now(), keyID, err)
		v := h.machine.verdict(h.now())
		h.setUsable(v)
		h.mu.Unlock()
		switch {
		case eff.DropAll:
			h.shred("", err)
			if eff.Revoked {
				h.log.Warn("key service says the key is revoked: new writes and cached keys are refused", "error", err)
			}
		case eff.Restored:
			h.log.Info("key service reports the key usable again", "key_id", keyID)
		case eff.Recovered:
			h.log.Info("key service reachable again", "key_id", keyID)
		case err != nil:
			h.log.Warn("key service probe failed", "error", err, "mode", v.Mode.String(), "grace_remaining", v.GraceRemaining.Round(time.Second).String())
		}
		if eff.KeyChanged {
			h.log.Info("remote key changed", "old_key_id", eff.OldKeyID, "key_id", keyID)
		}
		return keyID, err
	})
	if err != nil {
		return "", err
	}
	return v.(string), nil
}

// setUsable publishes v.Usable for the hot path; called with h.mu held.
func (h *Hierarchy) setUsable(v Verdict) {
	var until int64
	switch {
	case v.Mode == ModeHealthy:
		until = math.MaxInt64
	case v.Usable:
		until = h.now().Add(v.GraceRemaining).UnixNano()
	}
	h.usableUntil.Store(until)
}

// Health is the answer to Status.
type Health struct {
	OK bool
	// Reason is a short message when !OK, or a note when OK during an outage.
	Reason string
	// KeyID is the key_id Status reports: the key ID Encrypt seals under now,
	// or StoppedKeyID while sealing is refused.
	KeyID string
	// RemoteKeyID is the key ID the key service last reported.
	RemoteKeyID string
	Mode        Mode
	// GraceRemaining is the outage grace left (the full grace when reachable).
	GraceRemaining time.Duration
}

// Status returns the health from a probe at most ProbeInterval old. When the
// last probe is older, it probes, but waits at most StatusBudget for the
// answer (the probe goes on in the background) and otherwise answers from the
// last known state, so a hung key service never makes Status time out.
func (h *Hierarchy) Status(ctx context.Context) Health {
	h.mu.Lock()
	stale := h.machine.stale(h.now(), h.cfg.ProbeInterval)
	h.mu.Unlock()
	if stale {
		done := make(chan struct{})
		go func() {
			defer close(done)
			pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), h.cfg.RemoteTimeout)
			defer cancel()
			if keyID, err := h.probe(pctx); err == nil {
				_ = h.ensureKEK(pctx, keyID)
			}
		}()
		budget := time.NewTimer(h.cfg.StatusBudget)
		select {
		case <-done:
		case <-budget.C:
		case <-ctx.Done():
		}
		budget.Stop()
	}
	return h.health()
}

// health is the Status answer from the last known state (no remote call).
func (h *Hierarchy) health() Health {
	v := h.verdict()
	cur := ""
	if k := h.current.Load(); k != nil {
		cur = k.remoteKeyID
	}
	out := Health{OK: v.OK, Reason: v.Reason, KeyID: v.statusKeyID(cur), RemoteKeyID: v.RemoteKeyID, Mode: v.Mode, GraceRemaining: v.GraceRemaining}
	h.m.Health(out.OK, out.KeyID, out.GraceRemaining)
	return out
}

// SelfTest seals and opens a random value with the current local KEK (no
// remote call when the KEK is current): it answers "can the plugin encrypt
// right now".
func (h *Hierarchy) SelfTest(ctx context.Context) error {
	if h.current.Load() == nil {
		return errors.New("no local KEK yet")
	}
	probe := make([]byte, 32)
	if _, err := rand.Read(probe); err != nil {
		return err
	}
	s, err := h.Encrypt(ctx, probe)
	if err != nil {
		return fmt.Errorf("seal: %w", err)
	}
	if _, err := h.Decrypt(ctx, s.KeyID, s.Ciphertext, s.Annotations); err != nil {
		return fmt.Errorf("open: %w", err)
	}
	return nil
}
