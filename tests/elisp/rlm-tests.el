;;; rlm-tests.el --- ERT tests of rlm.el against a real daemon  -*- lexical-binding: t; -*-

;;; Commentary:

;; Run by tests/test_emacs.py, which starts a scripted model server on
;; loopback and a real daemon (python -m rlmd) on a short temp socket,
;; and passes, in the environment:
;;
;;   RLM_TEST_SOCKET   the daemon's socket
;;   RLM_TEST_TMP      a short temp directory
;;   RLM_TEST_PYTHON   the Python that runs rlmd (to test auto-start)
;;   RLM_TEST_CONFIG   the daemon's config file
;;
;; The scripted model answers by keywords in the question (see RULES in
;; tests/test_emacs.py): "streamtest" runs a block that makes a sub-call
;; and prints MARK-STREAM, then answers "The buffer holds many apples.";
;; "slowtest" never answers; "Review this diff" answers with a
;; src/app.py:2 reference; "babeltest" answers "Babel says 42.";
;; anything else answers "Generic answer.".

;;; Code:

(require 'ert)
(require 'cl-lib)
(require 'rlm)

(defvar rlm-test-socket (getenv "RLM_TEST_SOCKET")
  "Socket of the test daemon, or nil when run outside the wrapper.")

(defvar rlm-test-tmp (or (getenv "RLM_TEST_TMP") temporary-file-directory)
  "A short temp directory.")

(defmacro rlm-test-with-daemon (&rest body)
  "Run BODY talking to the test daemon (skip when there is none)."
  (declare (indent 0) (debug t))
  `(progn
     (unless rlm-test-socket
       (ert-skip "RLM_TEST_SOCKET is not set: run through tests/test_emacs.py"))
     (let ((rlm-socket-path rlm-test-socket)
           (rlm-daemon-command nil)
           (rlm-query-options nil))
       ,@body)))

(defun rlm-test-wait-for (pred &optional timeout)
  "Wait until PRED returns non-nil, at most TIMEOUT seconds; return it."
  (let ((deadline (+ (float-time) (or timeout 30))))
    (while (and (not (funcall pred)) (< (float-time) deadline))
      (accept-process-output nil 0.05))
    (funcall pred)))

(defun rlm-test-context-text (name)
  "Return the whole text of the daemon's context NAME."
  (let ((chars (plist-get (rlm-request 'context/info (list :name name)) :chars)))
    (plist-get (rlm-request 'context/peek (list :name name :start 0 :end chars)) :text)))

(defun rlm-test-finish (job)
  "Wait for JOB (at most a minute) and return it."
  (rlm-wait job 60)
  job)

;;;; Plumbing

(ert-deftest rlm-test-default-socket-follows-the-daemon ()
  (let ((process-environment (copy-sequence process-environment)))
    (setenv "RLMD_SOCKET" "/tmp/x/y.sock")
    (should (equal (rlm-default-socket-path) "/tmp/x/y.sock"))
    (setenv "RLMD_SOCKET" nil)
    (setenv "XDG_RUNTIME_DIR" "/run/user/4242")
    (should (equal (rlm-default-socket-path) "/run/user/4242/rlmd/rlmd.sock"))
    (setenv "XDG_RUNTIME_DIR" nil)
    (let ((expected (string-trim
                     (shell-command-to-string
                      (format "%s -W ignore -c 'import platformdirs; print(platformdirs.user_runtime_dir(\"rlmd\"))'"
                              (or (getenv "RLM_TEST_PYTHON") "python3"))))))
      (unless (string-match-p "\\`/" expected) (ert-skip "platformdirs is not importable"))
      (should (equal (rlm-default-socket-path)
                     (expand-file-name "rlmd.sock" expected))))))

(ert-deftest rlm-test-nul-escapes-are-replaced-even-when-split ()
  (let* ((got nil)
         (filter (rlm--nul-safe-filter (lambda (_proc s) (push s got))))
         (json "{\"t\":\"a\\u0000b\\\\u0000c\\\\\\u0000\"}"))
    ;; Every way of cutting the text in two gives the same result.
    (dotimes (i (1+ (length json)))
      (setq got nil)
      (funcall filter nil (substring json 0 i))
      (funcall filter nil (substring json i))
      (should (equal (apply #'concat (reverse got))
                     "{\"t\":\"a\\ufffdb\\\\u0000c\\\\\\ufffd\"}")))))

(ert-deftest rlm-test-nul-from-the-daemon-does-not-lose-replies ()
  (rlm-test-with-daemon
    (rlm-put-text "rlm-test:nul" "a\0b")
    (should (equal (plist-get (rlm-request 'context/peek '(:name "rlm-test:nul" :start 0 :end 3)
                                           5)
                              :text)
                   "a\ufffdb"))
    (rlm-drop "rlm-test:nul")))

(ert-deftest rlm-test-status ()
  (rlm-test-with-daemon
    (let ((st (rlm-status)))
      (should (stringp (plist-get st :version)))
      (should (numberp (plist-get st :pid)))
      (with-current-buffer "*rlm status*"
        (should (string-match-p "^s +ollama +up" (buffer-string)))))))

(ert-deftest rlm-test-dead-daemon-fails-clearly-and-fast ()
  (let* ((dir (make-temp-file "rlmdead" t))
         (rlm-socket-path (expand-file-name "none.sock" dir))
         (rlm--connection nil)
         (rlm-daemon-start-timeout 3))
    (unwind-protect
        (progn
          ;; The command runs and exits at once.
          (let* ((rlm-daemon-command '("false"))
                 (t0 (float-time))
                 (err (should-error (rlm-request 'daemon/status) :type 'rlm-error)))
            (should (string-match-p "did not start: `false --socket .*' exited with status 1"
                                    (error-message-string err)))
            (should (< (- (float-time) t0) 3)))
          ;; The command does not exist.
          (let* ((rlm-daemon-command '("/nonexistent/rlmd"))
                 (err (should-error (rlm-request 'daemon/status) :type 'rlm-error)))
            (should (string-match-p "cannot start the daemon: `/nonexistent/rlmd' is not an executable program"
                                    (error-message-string err))))
          ;; The command runs but never answers: bounded wait.
          (let* ((rlm-daemon-command '("sh" "-c" "sleep 60"))
                 (rlm-daemon-start-timeout 1)
                 (t0 (float-time))
                 (err (should-error (rlm-request 'daemon/status) :type 'rlm-error)))
            (should (string-match-p "no answer on .*none.sock after 1 s"
                                    (error-message-string err)))
            (should (< (- (float-time) t0) 3))
            (should-not (process-live-p rlm--daemon-process)))
          ;; Starting is disabled.
          (let* ((rlm-daemon-command nil)
                 (err (should-error (rlm-request 'daemon/status) :type 'rlm-error)))
            (should (string-match-p "no daemon answers on" (error-message-string err))))
          ;; A query on a buffer says the same and leaves no result buffer.
          (let ((rlm-daemon-command '("false"))
                (before (length (buffer-list))))
            (with-temp-buffer
              (insert "text")
              (should-error (rlm-query "anything") :type 'rlm-error))
            (should (= before (length (buffer-list)))))
          (should-not rlm--connection))
      (delete-directory dir t))))

(ert-deftest rlm-test-starts-the-daemon-when-none-answers ()
  (let ((python (getenv "RLM_TEST_PYTHON"))
        (config (getenv "RLM_TEST_CONFIG")))
    (unless (and python config) (ert-skip "RLM_TEST_PYTHON/RLM_TEST_CONFIG not set"))
    (let* ((dir (make-temp-file "rlmauto" t))
           (rlm-socket-path (expand-file-name "a.sock" dir))
           (rlm--connection nil)
           (rlm-daemon-start-timeout 40)
           (rlm-daemon-command (list python "-m" "rlmd" "--state-dir"
                                     (expand-file-name "st" dir) "--config" config)))
      (unwind-protect
          (let ((st (rlm-request 'daemon/status)))
            (should (equal (plist-get st :socket) rlm-socket-path))
            ;; The second call reuses the connection.
            (should (eq rlm--connection (rlm-connection)))
            ;; The daemon dies in the middle of a query: the query fails
            ;; at once, saying so, and the next request starts a new one.
            (let ((job (rlm-start-query "slowtest: forever" :display nil)))
              (should (rlm-test-wait-for
                       (lambda () (seq-contains-p (plist-get (rlm-request 'query/jobs) :jobs)
                                                  (rlm-job-id job)))
                       10))
              (signal-process (plist-get st :pid) 'KILL)
              (should (rlm-test-wait-for (lambda () (not (rlm-job-running-p job))) 5))
              (should (eq (rlm-job-state job) 'error))
              (should (string-match-p "the daemon closed the connection" (rlm-job-error job))))
            (let ((st2 (rlm-request 'daemon/status)))
              (should-not (equal (plist-get st2 :pid) (plist-get st :pid)))))
        (rlm-disconnect)
        (let ((proc rlm--daemon-process))
          (when (process-live-p proc)
            ;; rlm-stop-daemon says that the daemon drains, and waits.
            (let (said)
              (cl-letf* ((orig (symbol-function 'message))
                         ((symbol-function 'message)
                          (lambda (&rest args) (push (and (car args) (apply #'format args)) said)
                            (apply orig args))))
                (should (rlm-stop-daemon 20)))
              (should (equal (car said) "rlm: the daemon stopped"))
              (should (cl-some (lambda (m) (and m (string-match-p "draining" m))) said))))
          (when proc (delete-process proc)))
        (delete-directory dir t)))))

;;;; Queries

(ert-deftest rlm-test-buffer-query-streams-and-fires-the-hook ()
  (rlm-test-with-daemon
    (let* ((calls nil)
           (rlm-query-finished-functions
            (list (lambda (answer buffer) (push (list answer buffer) calls)))))
      (with-temp-buffer
        (rename-buffer "rlm-test-apples" t)
        (dotimes (i 200) (insert (format "line %d: an apple a day\n" i)))
        (let* ((job (rlm-query "streamtest: how many apples are there?"))
               (buf (rlm-job-buffer job))
               point-before)
          ;; Before anything streams in (no waiting happened yet), put
          ;; point where the trajectory grows.
          (with-current-buffer buf
            (should (derived-mode-p 'rlm-result-mode))
            (goto-char (point-max))
            (setq point-before (point)))
          (should (equal (rlm-job-context job) (concat "emacs:" (buffer-name))))
          (should (equal (rlm-test-context-text (rlm-job-context job))
                         (buffer-substring-no-properties (point-min) (point-max))))
          (should (rlm-job-running-p job))
          (rlm-test-finish job)
          (should (eq (rlm-job-state job) 'done))
          (should (equal (rlm-job-answer job) "The buffer holds many apples."))
          (should (equal calls (list (list "The buffer holds many apples." buf))))
          (should (>= (rlm-job-iteration job) 2))
          (should (>= (rlm-job-sub-calls job) 1))
          (with-current-buffer buf
            (let ((text (buffer-string)))
              ;; The answer sits above the trajectory, which holds the
              ;; streamed root output, the code's output and the sub-call.
              (should (string-match-p "\\`Question: streamtest" text))
              (should (< (string-match "The buffer holds many apples\\." text)
                         (string-match "▸ Trajectory" text)))
              (should (string-match-p "Let me look\\." text))
              (should (string-match-p "MARK-STREAM [0-9]+ sub-answer" text))
              (should (string-match-p "↳ llm_query [0-9a-f]+ to m (.* chars)" text))
              (should (string-match-p "↳ llm_query [0-9a-f]+: ok in [0-9.]+ s" text))
              (should (string-match-p "End: done" text)))
            ;; Point stayed on its text (just under the trajectory's
            ;; heading) instead of following the stream.
            (should (> point-before 1))
            (should (< (point) (point-max)))
            (should (looking-back "[▾▸] Trajectory\n" (line-beginning-position 0)))
            ;; The trajectory is folded now; TAB unfolds it.
            (should (overlay-get (rlm-view-overlay (rlm-job-view job)) 'invisible))
            (should (string-match-p "▸ Trajectory" (buffer-string)))
            (rlm-toggle-trajectory)
            (should-not (overlay-get (rlm-view-overlay (rlm-job-view job)) 'invisible))
            ;; The arrow turns with the fold (bug 7).
            (should (string-match-p "▾ Trajectory" (buffer-string)))
            (should-not (buffer-modified-p))
            ;; The whole answer is one undo step.
            (should (<= (cl-count nil buffer-undo-list) 1))
            (should (string-match-p "rlm: done\\(?: · [a-z ]+\\)* · m · turn [0-9]+ · [0-9]+ sub-calls? · .* tokens"
                                    (rlm--header-line)))))))))

(ert-deftest rlm-test-unchanged-buffer-is-sent-once ()
  (rlm-test-with-daemon
    (rlm-disconnect)
    (let ((rlm-events-buffer-size nil))   ; log the wire to count puts
      (unwind-protect
          (with-temp-buffer
            (rename-buffer "rlm-test-cache" t)
            (insert "alpha beta gamma\n")
            (let* ((log (jsonrpc-events-buffer (rlm-connection)))
                   (puts (lambda ()
                           (with-current-buffer log
                             (how-many ":method \"context/put\"" (point-min) (point-max))))))
              (should (equal (rlm-buffer-context) "emacs:rlm-test-cache"))
              (should (= (funcall puts) 1))
              (rlm-buffer-context)
              (should (= (funcall puts) 1))          ; unchanged: not sent again
              (insert "delta\n")
              (rlm-buffer-context)
              (should (= (funcall puts) 2))          ; changed: sent again
              (should (equal (rlm-test-context-text "emacs:rlm-test-cache")
                             "alpha beta gamma\ndelta\n"))
              (rlm-drop "emacs:rlm-test-cache")
              (rlm-buffer-context)
              (should (= (funcall puts) 3))          ; the daemon lost it: sent again
              (rlm-drop "emacs:rlm-test-cache")))
        (rlm-disconnect)))))

(ert-deftest rlm-test-large-texts-go-through-a-file-and-raw-bytes-are-replaced ()
  (rlm-test-with-daemon
    (let ((temporary-file-directory
           (file-name-as-directory (make-temp-file (expand-file-name "put" rlm-test-tmp) t))))
      (dolist (threshold '(nil 10))
        (with-temp-buffer
          (rename-buffer (format "rlm-test-big-%s" threshold) t)
          (insert "ab" (string (unibyte-char-to-multibyte 200)) "cd naïve ☕ 𝄞\n")
          (dotimes (i 50) (insert (format "line %d\n" i)))
          (let* ((rlm-file-transfer-threshold threshold)
                 (name (rlm-buffer-context)))
            (should (equal (rlm-test-context-text name)
                           (concat "ab\ufffdcd naïve ☕ 𝄞\n"
                                   (buffer-substring-no-properties
                                    (progn (goto-char (point-min)) (forward-line 1) (point))
                                    (point-max)))))
            (rlm-drop name))))
      ;; The temporary file is gone.
      (should (equal (directory-files temporary-file-directory nil "rlm-put-") nil))
      (delete-directory temporary-file-directory t))))

(ert-deftest rlm-test-region-sends-exactly-the-region ()
  (rlm-test-with-daemon
    (with-temp-buffer
      (rename-buffer "rlm-test-region" t)
      ;; Characters outside ASCII and the BMP: offsets are characters
      ;; and Content-Length counts bytes, both must hold.
      (insert "first liné\nsecond ☕ line has the 𝄞 needle\nthird line\n")
      (let ((transient-mark-mode t))
        (goto-char 12)
        (push-mark 12 t t)
        (goto-char 43)
        (should (use-region-p))
        (let ((job (rlm-query "regiontest: what is here?")))
          (should (equal (rlm-job-context job) "emacs:rlm-test-region:region"))
          (should (equal (rlm-test-context-text (rlm-job-context job))
                         "second ☕ line has the 𝄞 needle\n"))
          (rlm-test-finish job)
          (should (eq (rlm-job-state job) 'done))
          (should (equal (rlm-job-answer job) "Generic answer.")))))))

(ert-deftest rlm-test-subtree-sends-exactly-the-subtree ()
  (rlm-test-with-daemon
    (require 'org)
    (with-temp-buffer
      (rename-buffer "rlm-test-org" t)
      (insert "#+title: Notes\n* One\ntext one\n* Two\ntext two\n** Two child\nchild text\n* Three\ntext three\n")
      (org-mode)
      (goto-char (point-min))
      (search-forward "text two")
      (let ((job (rlm-query "subtreetest: what is in this section?")))
        (should (equal (rlm-test-context-text (rlm-job-context job))
                       "* Two\ntext two\n** Two child\nchild text\n"))
        (rlm-test-finish job)
        (should (eq (rlm-job-state job) 'done)))
      ;; With a prefix argument: the whole buffer.
      (let ((job (rlm-query "subtreetest: and the whole file?" t)))
        (should (equal (rlm-job-context job) "emacs:rlm-test-org"))
        (should (equal (rlm-test-context-text (rlm-job-context job))
                       (buffer-substring-no-properties (point-min) (point-max))))
        (rlm-test-finish job))
      ;; Before the first heading: the whole buffer too.
      (goto-char (point-min))
      (let ((job (rlm-query "subtreetest: the title?")))
        (should (equal (rlm-job-context job) "emacs:rlm-test-org"))
        (rlm-test-finish job)))))

(ert-deftest rlm-test-cancel-stops-a-running-query ()
  (rlm-test-with-daemon
    (with-temp-buffer
      (insert "a text to think about forever\n")
      (let* ((job (rlm-query "slowtest: take your time"))
             (buf (rlm-job-buffer job)))
        ;; Wait until the daemon runs it (and the model hangs).
        (should (rlm-test-wait-for
                 (lambda () (seq-contains-p (plist-get (rlm-request 'query/jobs) :jobs)
                                            (rlm-job-id job)))
                 10))
        (accept-process-output nil 1)
        (should (rlm-job-running-p job))
                (with-current-buffer buf
          (call-interactively (key-binding (kbd "C-c C-k"))))
        ;; Emacs stops at once...
        (should (eq (rlm-job-state job) 'cancelled))
        (with-current-buffer buf
          (should (string-match-p "^Cancelled" (buffer-string))))
        ;; ...and the daemon really stopped: its reply comes (the model
        ;; never would) and the job is gone.
        (should (rlm-test-wait-for (lambda () (rlm-job-reply job)) 15))
        (should (eql (plist-get (plist-get (rlm-job-reply job) :error) :code)
                     (rlm-error-code 'cancelled)))
        (should (equal (plist-get (rlm-request 'query/jobs) :jobs) [])))
      ;; Cancelling at once, before the daemon may even know the job,
      ;; still stops it there.
      (let ((job (rlm-query "slowtest: never mind")))
        (rlm-cancel-job job)
        (should (eq (rlm-job-state job) 'cancelled))
        (should (rlm-test-wait-for (lambda () (rlm-job-reply job)) 15))
        (should (equal (plist-get (rlm-request 'query/jobs) :jobs) [])))
      ;; Killing a result buffer cancels its query too.
      (let ((job (rlm-query "slowtest: again")))
        (should (rlm-test-wait-for
                 (lambda () (seq-contains-p (plist-get (rlm-request 'query/jobs) :jobs)
                                            (rlm-job-id job)))
                 10))
        (kill-buffer (rlm-job-buffer job))
        (should (eq (rlm-job-state job) 'cancelled))
        (should (rlm-test-wait-for (lambda () (rlm-job-reply job)) 15))
        (should (equal (plist-get (rlm-request 'query/jobs) :jobs) []))))))

(ert-deftest rlm-test-files-and-named-contexts ()
  (rlm-test-with-daemon
    (let ((dir (make-temp-file (expand-file-name "files" rlm-test-tmp) t)))
      (with-temp-file (expand-file-name "a.txt" dir) (insert "alpha file body\n"))
      (with-temp-file (expand-file-name "b.txt" dir) (insert "beta file body\n"))
      (let* ((job (rlm-query-files "filestest: what files are there?" (list dir)))
             (text (rlm-test-context-text (rlm-job-context job))))
        (should (string-match-p "alpha file body" text))
        (should (string-match-p "beta file body" text))
        (rlm-test-finish job)
        (should (eq (rlm-job-state job) 'done))
        ;; The same context, by name.
        (let ((again (rlm-test-finish
                      (rlm-query-context "namedtest: again?" (rlm-job-context job)))))
          (should (eq (rlm-job-state again) 'done))
          (should (equal (rlm-job-answer again) "Generic answer.")))))))

(ert-deftest rlm-test-missing-context-error-is-shown ()
  (rlm-test-with-daemon
    (let ((job (rlm-query-context "missingtest: anything?" "rlm-test:no-such-context")))
      (rlm-test-finish job)
      (should (eq (rlm-job-state job) 'error))
      (should (string-match-p "rlm-test:no-such-context" (rlm-job-error job)))
      (with-current-buffer (rlm-job-buffer job)
        (should (string-match-p "^Error: .*no-such-context" (buffer-string)))))))

(ert-deftest rlm-test-contexts-list-peek-search-drop ()
  (rlm-test-with-daemon
    (rlm-put-text "rlm-test:list" "hello world\nsecond line\n")
    (with-current-buffer (rlm-contexts)
      (should (derived-mode-p 'rlm-contexts-mode))
      (goto-char (point-min))
      (should (re-search-forward "^ +rlm-test:list +" nil t))
      (beginning-of-line)
      (should (equal (rlm--contexts-name) "rlm-test:list"))
      (with-current-buffer (rlm-contexts-peek)
        (should (string-match-p "\\`hello world\nsecond line\n" (buffer-string))))
      (let ((matches (rlm-contexts-search "sec.nd")))
        (should (= (length matches) 1))
        (should (= (plist-get (car matches) :line) 2)))
      (should (eq (rlm-drop "rlm-test:list") t)))
    (with-current-buffer "*rlm contexts*"
      (revert-buffer)
      (goto-char (point-min))
      (should-not (re-search-forward "^ +rlm-test:list " nil t)))))

(ert-deftest rlm-test-trace-of-a-query ()
  (rlm-test-with-daemon
    (let ((job (rlm-test-finish
                (rlm-start-query "tracetest: no context needed" :display nil))))
      (should (eq (rlm-job-state job) 'done))
      (with-current-buffer (rlm-trace (rlm-job-id job))
        (should (string-match-p (format "Trace of %s (\\([1-9][0-9]*\\) records)"
                                        (regexp-quote (rlm-job-id job)))
                                (buffer-string)))
        (should (string-match-p "Generic answer" (buffer-string)))))))

(ert-deftest rlm-test-query-sync ()
  (rlm-test-with-daemon
    (should (equal (rlm-query-sync "synctest: hello" :text "some text") "Generic answer."))))

;;;; Diff review without Magit

(defconst rlm-test-diff
  "diff --git a/src/app.py b/src/app.py
index 1111111..2222222 100644
--- a/src/app.py
+++ b/src/app.py
@@ -1,2 +1,5 @@
 def total(xs):
-    return sum(xs)
+    return sum(x for x in xs)
+
+def count(xs):
+    return len(xs)
"
  "A small unified diff.")

(ert-deftest rlm-test-diff-line-position ()
  (with-temp-buffer
    (insert rlm-test-diff)
    (goto-char (rlm-diff-line-position (current-buffer) "src/app.py" 2))
    (should (looking-at-p "\\+    return sum(x for x in xs)"))
    (goto-char (rlm-diff-line-position (current-buffer) "src/app.py" 5))
    (should (looking-at-p "\\+    return len(xs)"))
    (should-not (rlm-diff-line-position (current-buffer) "other.py" 1))))

(ert-deftest rlm-test-review-diff-links-to-the-diff ()
  (rlm-test-with-daemon
    (require 'diff-mode)
    (with-temp-buffer
      (rename-buffer "rlm-test.diff" t)
      (insert rlm-test-diff)
      (diff-mode)
      (let* ((diff-buf (current-buffer))
             (job (rlm-test-finish (rlm-review-diff))))
        (should (eq (rlm-job-state job) 'done))
        (should (string-match-p "src/app.py:2" (rlm-job-answer job)))
        (with-current-buffer (rlm-job-buffer job)
          (goto-char (point-min))
          (search-forward "src/app.py:2")
          (let ((button (button-at (match-beginning 0))))
            (should button)
            (save-window-excursion
              (button-activate button)
              (should (eq (current-buffer) diff-buf))
              (should (looking-at-p "\\+    return sum(x for x in xs)")))))))))

(provide 'rlm-tests)
;;; rlm-tests.el ends here
